"""Coordinator failover time over repeated runs, printed as JSON.

    .venv/bin/python -m bench.failover [--runs 5] [--streams 60] [--heartbeat 0.5] [--hosts]

Each run: three nodes (broker + 2 synthetic workers each, priorities 2/1/0; gateways on
the two nodes that do not coordinate), on loopback with static peers, or with
``--hosts`` each in its own network namespace on a bridge, found over mDNS (as
tests/test_netns_mesh.py; needs root). Streams flow through those gateways and the
coordinator's broker is SIGKILLed. For every stream, its stall: the longest wait between
two of its tokens from the kill on (what its client sees; tokens flow every 0.05 s when
nothing happens); per run the median, p90 and worst stream; over all runs min / median /
p90 / max of those. (Until 2026-11-30 this measured the end of that longest wait after
the kill, which for a stream that hardly stalled was an ordinary gap anywhere up to its
last token: runs showed "2.9 s" where nothing had waited.)

Every stream's text is compared with what the synthetic engine generates for its prompt
(``testkit.scenarios.kill_coordinator_under_streams``, the scenario the tests
assert): a run counts its streams as exact only when all of them are; a run with a stream
that differs, an error event, a broken connection or a stream that never ends is reported
as failed (the check stops at the first such stream) and left out of the timings. The
report starts with the date, the commit, the uncommitted changes and the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.routing import pct, provenance
from testkit import netns
from testkit.harness import Mesh, wait_for
from testkit.netns import HostMesh
from testkit.scenarios import NODES, kill_coordinator_under_streams, start_nodes
from testkit.sse import StreamFailed

TOKENS = 60


def one_run(tmp: Path, streams: int, heartbeat: float, hosts: bool) -> dict[str, Any]:
    with netns.Hosts(NODES) if hosts else contextlib.nullcontext() as network:
        return run_in(HostMesh(tmp, network) if network else Mesh(tmp, NODES), streams,
                      heartbeat)


def run_in(mesh: Mesh, streams: int, heartbeat: float) -> dict[str, Any]:
    mesh.env["MLX_STACK_HEARTBEAT_INTERVAL"] = str(heartbeat)
    try:
        for node in NODES:
            mesh.start_broker(node)
        wait_for("one coordinator", mesh.coordinator, timeout=20)
        urls = list(start_nodes(mesh, gateways=["node-b", "node-c"]).values())
        wait_for("6 workers", lambda: mesh.status_says("node-a", lambda s: len(s.workers) == 6),
                 timeout=30)
        try:
            report = kill_coordinator_under_streams(mesh, urls, streams, tokens=TOKENS)
        except (AssertionError, TimeoutError, httpx.HTTPError, StreamFailed) as exc:
            # "AssertionError: 17": stream 17 is the first whose text differs
            return {"streams": streams, "all_exact": False,
                    "failure": f"{type(exc).__name__}: {exc}"}
    finally:
        mesh.close()
    return {"streams": streams, "all_exact": True, "exact_streams": streams,
            "inexact_streams": 0, "streams_timed": report["streams"],
            "median_s": report["median_s"], "p90_s": report["p90_s"], "max_s": report["max_s"]}


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values),
            "p90": pct(values, 0.9), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=60)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--hosts", action="store_true",
                        help="run each node in its own network namespace (root)")
    args = parser.parse_args()
    if not __debug__:
        parser.error("the text check is an assert: run without -O")
    if args.hosts and (why := netns.available()):
        parser.error(f"--hosts: {why}")
    info = provenance()
    tmp = Path(tempfile.mkdtemp(prefix="mlxs-failover-"))
    runs = [one_run(tmp / f"run-{i}", args.streams, args.heartbeat, args.hosts)
            for i in range(args.runs)]
    passed = [r for r in runs if r["all_exact"]]
    print(json.dumps({
        "benchmark": "coordinator_failover",
        "command": f".venv/bin/python -m bench.failover --runs {args.runs} --streams "
                   f"{args.streams} --heartbeat {args.heartbeat}"
                   + (" --hosts" if args.hosts else ""),
        **info, "network": "namespaces, mDNS" if args.hosts else "loopback, static peers",
        "heartbeat_s": args.heartbeat, "streams": args.streams,
        "tokens_per_stream": TOKENS, "runs": runs,
        "streams_total": args.runs * args.streams,
        "exact_streams_total": sum(r["exact_streams"] for r in passed),
        "runs_failed": len(runs) - len(passed),
        "stall_worst_stream_s": summary([r["max_s"] for r in passed]),
        "stall_p90_stream_s": summary([r["p90_s"] for r in passed]),
        "stall_median_stream_s": summary([r["median_s"] for r in passed]),
    }, indent=2))


if __name__ == "__main__":
    main()
