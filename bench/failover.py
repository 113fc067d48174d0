"""Coordinator failover time over repeated runs, printed as JSON.

    .venv/bin/python -m bench.failover [--runs 5] [--streams 60] [--heartbeat 0.5]

Each run: three nodes on loopback (broker + 2 synthetic workers each, static peers,
priorities 2/1/0; gateways on the two nodes that do not coordinate); streams flow through
those gateways and the coordinator's broker is SIGKILLed. For every stream, the time from
the kill to its first resumed token; per run the median and the worst stream; over all
runs min / median / max of those.

Every stream's text is compared with what the synthetic engine generates for its prompt
(``tests.test_coordinator.kill_coordinator_under_streams``, the scenario the tests
assert): a run counts its streams as exact only when all of them are; a run with a stream
that differs, an error event, a broken connection or a stream that never ends is reported
as failed (the check stops at the first such stream) and left out of the timings. The
report starts with the date, the commit, the uncommitted changes and the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.routing import provenance
from tests.harness import Mesh, free_port, wait_for
from tests.test_coordinator import NODES, healthy, kill_coordinator_under_streams

TOKENS = 60


def one_run(tmp: Path, streams: int, heartbeat: float) -> dict[str, Any]:
    mesh = Mesh(tmp, NODES, env={"MLX_STACK_HEARTBEAT_INTERVAL": str(heartbeat)})
    try:
        for node in NODES:
            mesh.start_broker(node)
        wait_for("one coordinator", mesh.coordinator, timeout=15)
        urls = []
        for node in NODES:
            for _ in range(2):
                mesh.start("worker", "--engine", "synthetic", "--model", "syn", "--slots",
                           "40", "--rate", "20", node=node)
            if node != "node-a":
                port = free_port()
                mesh.start("gateway", "--port", str(port), node=node)
                urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_for("gateway", lambda u=url: healthy(u), timeout=30)
        wait_for("6 workers", lambda: len(mesh.status("node-a").workers) == 6, timeout=30)
        try:
            report = kill_coordinator_under_streams(mesh, urls, streams, tokens=TOKENS)
        except (AssertionError, TimeoutError, httpx.HTTPError) as exc:
            # "AssertionError: 17": stream 17 is the first whose text differs
            return {"streams": streams, "all_exact": False,
                    "failure": f"{type(exc).__name__}: {exc}"}
    finally:
        mesh.close()
    return {"streams": streams, "all_exact": True, "exact_streams": streams,
            "inexact_streams": 0, "streams_timed": report["streams"],
            "median_s": report["median_s"], "max_s": report["max_s"]}


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=60)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    args = parser.parse_args()
    if not __debug__:
        parser.error("the text check is an assert: run without -O")
    info = provenance()
    tmp = Path(tempfile.mkdtemp(prefix="mlxs-failover-"))
    runs = [one_run(tmp / f"run-{i}", args.streams, args.heartbeat) for i in range(args.runs)]
    passed = [r for r in runs if r["all_exact"]]
    print(json.dumps({
        "benchmark": "coordinator_failover",
        "command": f".venv/bin/python -m bench.failover --runs {args.runs} --streams "
                   f"{args.streams} --heartbeat {args.heartbeat}",
        **info, "heartbeat_s": args.heartbeat, "streams": args.streams,
        "tokens_per_stream": TOKENS, "runs": runs,
        "streams_total": args.runs * args.streams,
        "exact_streams_total": sum(r["exact_streams"] for r in passed),
        "runs_failed": len(runs) - len(passed),
        "kill_to_first_resumed_token_worst_stream_s": summary([r["max_s"] for r in passed]),
        "kill_to_first_resumed_token_median_stream_s": summary(
            [r["median_s"] for r in passed]),
    }, indent=2))


if __name__ == "__main__":
    main()
