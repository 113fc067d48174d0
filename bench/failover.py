"""Coordinator failover time over repeated runs, printed as JSON.

    .venv/bin/python -m bench.failover [--runs 5] [--streams 60] [--heartbeat 0.5]

Each run: three nodes on loopback (broker + gateway + 2 synthetic workers each, static
peers, priorities 2/1/0); streams flow through the gateways of the two nodes that do not
coordinate; the coordinator's broker is SIGKILLed. For every stream, the time from the
kill to its first resumed token (the end of its longest stall); per run the median and
the worst stream; over all runs min / median / max of those.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests.harness import Mesh, free_port, wait_for
from tests.test_coordinator import NODES, healthy, stream


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
        arrivals: list[list[float]] = [[] for _ in range(streams)]
        killed: list[float] = []

        async def main() -> None:
            limits = httpx.Limits(max_connections=streams + 10)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                flowing = [asyncio.Event() for _ in range(streams)]
                tasks = [asyncio.create_task(stream(client, urls[i % 2], i, 60, arrivals[i],
                                                    flowing[i])) for i in range(streams)]
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flowing)), 60)
                mesh.brokers["node-a"].kill(signal.SIGKILL)
                killed.append(time.monotonic())
                await asyncio.wait_for(asyncio.gather(*tasks), 90)

        asyncio.run(main())
    finally:
        mesh.close()
    gaps = [max(itertools.pairwise(a), key=lambda pair: pair[1] - pair[0])[1] - killed[0]
            for a in ([t for t in arr if t > killed[0] - 0.2] for arr in arrivals)
            if len(a) > 1]
    return {"median_s": round(statistics.median(gaps), 3), "max_s": round(max(gaps), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=60)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlxs-failover-"))
    runs = [one_run(tmp / f"run-{i}", args.streams, args.heartbeat) for i in range(args.runs)]
    worst = [r["max_s"] for r in runs]
    print(json.dumps({
        "benchmark": "coordinator_failover", "heartbeat_s": args.heartbeat,
        "streams": args.streams, "runs": runs,
        "kill_to_first_resumed_token_worst_stream_s": {
            "min": min(worst), "median": statistics.median(worst), "max": max(worst)},
        "kill_to_first_resumed_token_median_stream_s": {
            "min": min(r["median_s"] for r in runs),
            "median": statistics.median(r["median_s"] for r in runs),
            "max": max(r["median_s"] for r in runs)},
    }, indent=2))


if __name__ == "__main__":
    main()
