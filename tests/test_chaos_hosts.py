"""Everything at once (issue 28): three netns hosts, one of them still on the previous
protocol; 5% packet loss on one link; workers SIGKILLed and SIGSTOPped, a standby broker
and then the coordinator SIGKILLed (and started again); an engine step error in every
100th stream; 500 streams through the two current nodes' gateways and the old node's own
(the scenario is testkit.chaos, which bench.chaos runs over several seeds). 0 failed,
0 hung, 0 wrong text, and every fault struck while streams were live. (A request whose
connection failed before any response is sent again, as HTTP clients do, and counted.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit import chaos, netns
from testkit.harness import close_and_report
from testkit.netns import HostMesh
from testkit.scenarios import NODES

pytestmark = pytest.mark.skipif(chaos.unavailable() is not None,
                                reason=str(chaos.unavailable()))


def test_500_streams_through_kills_stops_loss_engine_errors_and_an_older_node(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with netns.Hosts(NODES) as hosts:
        mesh = HostMesh(tmp_path, hosts)
        try:
            result = chaos.run_chaos(mesh, seed=chaos.SEED, streams=chaos.STREAMS)
            print(f"chaos: {result.streams} streams, {len(result.failed)} failed, "
                  f"{len(result.wrong)} wrong, {result.retried} sent again before any "
                  f"response; faults: {result.faults}; route outcomes at the coordinator "
                  f"since it restarted: {result.route_outcomes}")
            assert not result.failed, result.failed
            assert not result.wrong, result.wrong
            assert all(f.struck_live for f in result.faults), result.faults
            # the step errors struck too
            assert result.step_errors >= result.streams // 100 - 1, result.step_errors
        finally:
            close_and_report(mesh, request.node)
