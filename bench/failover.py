"""Coordinator failover time over repeated runs, printed as JSON.

    .venv/bin/python -m bench.failover [--runs 5] [--streams 60] [--heartbeat 0.5]

Each run: three nodes on loopback (broker + 2 synthetic workers each, static peers,
priorities 2/1/0; gateways on the two nodes that do not coordinate); streams flow through
those gateways and the coordinator's broker is SIGKILLed. For every stream, the time from
the kill to its first resumed token; per run the median and the worst stream; over all
runs min / median / max of those.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tests.harness import Mesh, free_port, wait_for
from tests.test_coordinator import NODES, healthy, kill_coordinator_under_streams


def one_run(tmp: Path, streams: int, heartbeat: float) -> dict[str, float]:
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
        wait_for("6 workers", lambda: len(mesh.status("node-a")["workers"]) == 6, timeout=30)
        report = kill_coordinator_under_streams(mesh, urls, streams, tokens=60)
    finally:
        mesh.close()
    return {"median_s": report["median_s"], "max_s": report["max_s"]}


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=60)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlxs-failover-"))
    runs = [one_run(tmp / f"run-{i}", args.streams, args.heartbeat) for i in range(args.runs)]
    print(json.dumps({
        "benchmark": "coordinator_failover", "heartbeat_s": args.heartbeat,
        "streams": args.streams, "runs": runs,
        "kill_to_first_resumed_token_worst_stream_s": summary([r["max_s"] for r in runs]),
        "kill_to_first_resumed_token_median_stream_s": summary(
            [r["median_s"] for r in runs]),
    }, indent=2))


if __name__ == "__main__":
    main()
