"""Routing benchmarks with the synthetic engine, printed as JSON.

    .venv/bin/python -m bench.routing [overhead|throughput|scaling|all]

1. overhead: time to first token and whole-stream time through gateway + broker +
   worker, minus the same synthetic engine called directly, p50/p99, at concurrency 1
   and 32, against two baselines: in-process (no HTTP at all), and over HTTP from its own
   minimal server (``bench/http_backend.py``; what a client would call without the mesh,
   and how the LiteLLM comparison was measured). The "per token" figure is the added
   whole-stream time divided by the tokens.
2. throughput: the most streamed tokens/s one gateway delivers to many clients.
3. scaling: aggregate tokens/s with 1, 2 and 3 nodes of fixed capacity (each node: a
   gateway and one synthetic worker whose rate is the capacity); the ratio is the figure.

Every process is real (``python -m cli ...`` on loopback); the load comes from one asyncio
process with httpx. Run from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from common import protocol as p
from common.meshkeys import new_secret
from tests.harness import Cluster, Proc, free_port, wait_for
from worker.runner import run_job
from worker.synthetic import SyntheticEngine


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def chat_body(content: str, max_tokens: int) -> dict[str, Any]:
    return {"model": "syn", "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": content}]}


async def stream_once(client: httpx.AsyncClient, url: str, content: str,
                      max_tokens: int) -> tuple[float, float, int, int]:
    """(time to first token, whole time, completion tokens, content events) of one
    streamed request."""
    start = time.perf_counter()
    first = 0.0
    tokens = events = 0
    async with client.stream("POST", f"{url}/v1/chat/completions",
                             json=chat_body(content, max_tokens)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                events += 1
                first = first or time.perf_counter() - start
    return first, time.perf_counter() - start, tokens, events


async def load(urls: list[str], requests: int, concurrency: int, max_tokens: int
               ) -> tuple[list[tuple[float, float, int, int]], float]:
    """Run ``requests`` streams, ``concurrency`` at a time, round-robin over ``urls``."""
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> tuple[float, float, int, int]:
            async with semaphore:
                return await stream_once(client, urls[i % len(urls)], f"request {i}",
                                         max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        return list(results), time.perf_counter() - start


def direct(engine: SyntheticEngine, requests: int, concurrency: int,
           max_tokens: int) -> list[tuple[float, float, int, int]]:
    """The same streams on the engine in-process, ``concurrency`` threads at a time."""
    results: list[tuple[float, float, int, int]] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        for i in counter:
            request = p.GenerationRequest(kind="chat", max_tokens=max_tokens, messages=[
                {"role": "user", "content": f"request {i}"}])
            first: list[float] = []
            start = time.perf_counter()

            def send(msg: p.Message, first: list[float] = first, start: float = start) -> None:
                if isinstance(msg, p.Partial) and msg.text and not first:
                    first.append(time.perf_counter() - start)

            run_job(engine, p.Job(job_id=str(i), request=request.to_dict()), lambda: False,
                    send)
            with lock:
                results.append((first[0], time.perf_counter() - start, max_tokens, 0))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def start_http_backend(cluster: Cluster, rate: float, ttft: float) -> str:
    port = free_port()
    proc = Proc("http-backend", [sys.executable, "-m", "bench.http_backend", "--port",
                                 str(port), "--rate", str(rate), "--ttft", str(ttft)],
                cluster.env, cluster.tmp / "http-backend.log")
    cluster.procs.append(proc)

    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        return False

    wait_for("the HTTP baseline backend", listening, timeout=30)
    return f"http://127.0.0.1:{port}"


def overhead(tmp: Path) -> dict[str, Any]:
    """Added latency of the mesh, plain and with CURVE (a mesh secret), against the engine
    in-process and behind its own HTTP server."""
    # A model-like engine (50 tokens/s per stream after 20 ms): at concurrency 32 the
    # mesh then carries 1,600 tokens/s, so this measures overhead, not saturation.
    rate, ttft, tokens = 50.0, 0.02, 32
    engine = SyntheticEngine("syn", slots=32, rate=rate, ttft=ttft)
    meshes = {"mesh": Cluster(tmp / "overhead"),
              "mesh_curve": Cluster(tmp / "overhead-curve", secret=new_secret())}
    out: dict[str, Any] = {"engine": {"rate_tokens_per_s": rate, "ttft_s": ttft},
                           "tokens_per_request": tokens}
    try:
        urls = {}
        for name, cluster in meshes.items():
            cluster.broker()
            cluster.worker("--engine", "synthetic", "--model", "syn", "--slots", "32",
                           "--rate", str(rate), "--ttft", str(ttft))
            urls[name] = cluster.gateway()
        backend = start_http_backend(meshes["mesh"], rate, ttft)
        for warm in (*urls.values(), backend):
            asyncio.run(load([warm], 20, 4, tokens))
        for concurrency, requests in ((1, 100), (32, 320)):
            runs = {name: asyncio.run(load([url], requests, concurrency, tokens))[0]
                    for name, url in urls.items()}
            runs["in_process"] = direct(engine, requests, concurrency, tokens)
            runs["http"] = asyncio.run(load([backend], requests, concurrency, tokens))[0]
            row: dict[str, Any] = {"requests": requests}
            for name, index in (("ttft", 0), ("stream", 1)):
                for q, label in ((0.5, "p50"), (0.99, "p99")):
                    ms = {k: pct([r[index] for r in v], q) * 1000 for k, v in runs.items()}
                    row[f"{name}_ms_{label}"] = {k: round(v, 3) for k, v in ms.items()}
                    row[f"{name}_added_ms_{label}"] = {
                        f"{mesh}_vs_{base}": round(ms[mesh] - ms[base], 3)
                        for mesh in meshes for base in ("in_process", "http")}
            for label in ("p50", "p99"):
                row[f"per_token_added_ms_{label}"] = {
                    k: round(v / tokens, 4) for k, v in row[f"stream_added_ms_{label}"].items()}
            out[f"concurrency_{concurrency}"] = row
    finally:
        for cluster in meshes.values():
            cluster.close()
    return out


def throughput(tmp: Path) -> dict[str, Any]:
    """Two loads through one gateway: "paced", many streams each at a model-like rate
    (tokens mostly travel one per event), and "flood", engines as fast as they can go
    (the outbox and the gateway merge what piles up into fewer, larger events)."""
    out: dict[str, Any] = {}
    for name, streams, tokens, rate in (("paced", 200, 400, 80.0),
                                        ("flood", 64, 2000, 4000.0)):
        cluster = Cluster(tmp / f"throughput-{name}", env={"MLX_STACK_QUEUE_SIZE": "10000"})
        try:
            cluster.broker()
            for node in ("node-a", "node-b"):
                cluster.worker("--engine", "synthetic", "--model", "syn", "--slots",
                               str(streams), "--rate", str(rate), node=node)
            url = cluster.gateway()
            asyncio.run(load([url], 8, 8, 50))
            results, elapsed = asyncio.run(load([url], streams, streams, tokens))
        finally:
            cluster.close()
        total = sum(r[2] for r in results)
        events = sum(r[3] for r in results)
        out[name] = {"streams": streams, "tokens_per_stream": tokens,
                     "engine_rate_per_stream": rate,
                     "offered_tokens_per_s": round(streams * rate),
                     "seconds": round(elapsed, 3), "tokens_per_s": round(total / elapsed),
                     "sse_events_per_s": round(events / elapsed),
                     "tokens_per_event": round(total / events, 2)}
    return out


def scaling(tmp: Path) -> dict[str, Any]:
    """Each node: one worker of 8 slots x 25 tokens/s = 200 tokens/s of capacity."""
    slots, rate, tokens = 8, 25.0, 50
    out: dict[str, Any] = {"node_capacity_tokens_per_s": slots * rate}
    for n in (1, 2, 3):
        cluster = Cluster(tmp / f"scaling-{n}", env={"MLX_STACK_QUEUE_SIZE": "10000"})
        try:
            cluster.broker()
            names = [f"node-{i}" for i in range(n)]
            for node in names:
                cluster.worker("--engine", "synthetic", "--model", "syn", "--slots",
                               str(slots), "--rate", str(rate), node=node)
            urls = [cluster.gateway(node=node) for node in names]
            # Twice the mesh's seats, so every slot stays busy.
            results, elapsed = asyncio.run(load(urls, 12 * slots * n, 2 * slots * n, tokens))
        finally:
            cluster.close()
        out[f"nodes_{n}"] = {"tokens_per_s": round(sum(r[2] for r in results) / elapsed, 1),
                             "seconds": round(elapsed, 2)}
    out["ratio_3_over_1"] = round(out["nodes_3"]["tokens_per_s"] /
                                  out["nodes_1"]["tokens_per_s"], 3)
    out["ratio_2_over_1"] = round(out["nodes_2"]["tokens_per_s"] /
                                  out["nodes_1"]["tokens_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="?", default="all",
                        choices=["overhead", "throughput", "scaling", "all"])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlxs-bench-"))
    runs = {"overhead": overhead, "throughput": throughput, "scaling": scaling}
    chosen = runs if args.which == "all" else {args.which: runs[args.which]}
    report = {"benchmark": "routing", "python": sys.version.split()[0]}
    report.update({name: fn(tmp) for name, fn in chosen.items()})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
