"""Routing benchmarks with the synthetic engine, printed as JSON.

    .venv/bin/python -m bench.routing [overhead|throughput|scaling|all]

1. overhead: time to first token and whole-stream time through gateway + broker +
   worker, minus the same synthetic engine called directly, p50/p99, at concurrency 1
   and 32, against two baselines: in-process (no HTTP at all), and over HTTP from its own
   minimal server (``bench/http_backend.py``; what a client would call without the mesh,
   and how the LiteLLM comparison was measured). The "per token" figure is the added
   whole-stream time divided by the tokens.
2. throughput: streamed tokens/s one gateway delivers to many clients, at a model-like
   pace and with engines as fast as they go.
3. scaling: tokens/s through ONE gateway (on node 1) while the mesh has 1, 2 and 3 nodes
   of fixed capacity (each node: one synthetic worker whose slots x rate is the capacity);
   the ratio to 1 node is the figure.

Tokens are counted in the text the client receives (the synthetic engine streams one word
`` wNNNN`` per token), never from ``usage``; every stream's text is compared with what the
synthetic engine generates for its prompt (``worker.synthetic.next_token``), and the
streams that differ are counted ("inexact_streams"). The report starts with the date, the
commit, the uncommitted changes and the machine. Every process is real (``python -m mlx_stack.cli
...`` on loopback); the load comes from one asyncio process with httpx. Run from the
repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import psutil

from mlx_stack.common import messages as msgs
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.meshkeys import new_secret
from mlx_stack.worker.batch import BatchLoop
from mlx_stack.worker.synthetic import SyntheticEngine
from testkit.harness import Cluster, Proc, free_port, wait_for
from testkit.scenarios import expected_text
from testkit.sse import chat_body, read_chat

ROOT = Path(__file__).resolve().parent.parent
WORD = re.compile(r" w\d+")
"""One synthetic token as the client receives it (``worker.synthetic.word``)."""


class Streamed(NamedTuple):
    """One streamed request as the client saw it."""

    ttft: float
    """Seconds from sending to the first content."""
    seconds: float
    """Seconds from sending to the end of the stream."""
    content: str
    """The user message sent (the synthetic engine's prompt)."""
    text: str
    """Every content delta received, joined."""
    events: int
    """SSE events that carried content."""
    node: str
    """The node that served it (``x-mlx-stack-node``)."""


def received(results: list[Streamed], max_tokens: int) -> dict[str, int]:
    """What the clients received: synthetic tokens counted in the streamed texts, and the
    streams whose text is not exactly the synthetic engine's sequence for their prompt."""
    return {"streams": len(results),
            "tokens_received": sum(len(WORD.findall(r.text)) for r in results),
            "inexact_streams": sum(r.text != expected_text(r.content, max_tokens)
                                   for r in results)}


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance() -> dict[str, Any]:
    """When, from what tree and on what machine a run was made."""
    changed = git("status", "--porcelain").splitlines()
    return {"date": datetime.date.today().isoformat(),
            "commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "dirty": bool(changed), "changed_files": [line[3:] for line in changed],
            "python": platform.python_version(),
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "cpus": os.cpu_count(),
                        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
                        "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def stream_once(client: httpx.AsyncClient, url: str, content: str,
                      max_tokens: int, messages: list[dict[str, str]] | None = None,
                      **more: Any) -> Streamed:
    """One streamed request; the text is kept, to be counted and checked after the load.
    ``messages``: a whole conversation instead of one user message ``content`` (then
    ``content`` is its messages joined by newlines, the synthetic engine's prompt);
    ``more``: other fields of the body. A refusal or an error event raises
    :class:`testkit.sse.StreamFailed`."""
    body = chat_body(content, max_tokens, **more)
    if messages:
        body["messages"] = messages
    stream = (await read_chat(client, url, body)).check()
    return Streamed(stream.ttft or 0.0, stream.seconds, content, stream.text,
                    len(stream.content_arrivals), stream.node)


@contextlib.contextmanager
def quiet_heap() -> Iterator[None]:
    """No garbage collection in this process (the load's) while it measures.

    The load process holds httpx, the harness and every result so far. At concurrency 32
    on the 2-vCPU VM a full collection of its heap took 60-110 ms (two in four rounds of
    480 streams), younger ones 2-6 ms many times a second, and every stream then in flight
    looked that much slower: the slowest 1% of the mesh and of the baseline alike were
    this process's pauses, not theirs. So its heap is frozen and collection held off for
    the load, and done once after. Not nested: the inner one would turn collection back
    on."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()
        gc.collect()


async def interleaved(urls: list[str], streams: int, max_tokens: int, warm: int = 20
                      ) -> list[list[Streamed]]:
    """``streams`` sequential streams to each url (after ``warm`` more), one to each url
    in turn, the first url of each turn rotating: every system's figure is taken over the
    same minutes, whatever the machine's drift."""
    runs: list[list[Streamed]] = [[] for _ in urls]
    with quiet_heap():
        async with httpx.AsyncClient(timeout=60) as client:
            for i in range(warm):
                for url in urls:
                    await stream_once(client, url, f"warm {i}", max_tokens)
            for i in range(streams):
                for j in range(len(urls)):
                    k = (i + j) % len(urls)
                    runs[k].append(await stream_once(client, urls[k], f"request {i}",
                                                     max_tokens))
    return runs


async def load(urls: list[str], requests: int, concurrency: int, max_tokens: int,
               ramp: float = 0.0) -> tuple[list[Streamed], float]:
    """Run ``requests`` streams, ``concurrency`` at a time, round-robin over ``urls``.

    ``ramp`` > 0 starts the first ``concurrency`` streams spread over that many seconds,
    as a steady load would have them; at 0 they all start at once (a burst). Streams of
    one length that start together end together, so the next ones start together too:
    without a ramp, every stream of the load comes in a burst."""
    limits = httpx.Limits(max_connections=concurrency + 8)
    with quiet_heap():
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            semaphore = asyncio.Semaphore(concurrency)

            async def one(i: int) -> Streamed:
                async with semaphore:
                    if i < concurrency and ramp > 0:
                        await asyncio.sleep(ramp * i / concurrency)
                    return await stream_once(client, urls[i % len(urls)], f"request {i}",
                                             max_tokens)

            start = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(requests)))
            return list(results), time.perf_counter() - start


def direct(engine: SyntheticEngine, requests: int, concurrency: int,
           max_tokens: int) -> list[Streamed]:
    """The same streams on the worker's batch loop in-process (no sockets), ``concurrency``
    at a time: each one that ends starts the next."""
    results: list[Streamed] = []
    jobs: dict[str, tuple[float, str, list[str]]] = {}
    """Job id -> (start, content, texts received)."""
    firsts: dict[str, float] = {}
    counter = iter(range(requests))
    lock = threading.Lock()
    done = threading.Event()

    def submit() -> None:
        with lock:
            i = next(counter, None)
            if i is None:
                return
            content = f"request {i}"
            jobs[str(i)] = (time.perf_counter(), content, [])
        request = GenerationRequest(kind="chat", max_tokens=max_tokens, messages=[
            {"role": "user", "content": content}])
        loop.put(msgs.Job(job_id=str(i), request=request))

    def send(msg: msgs.Message) -> None:  # on the loop's thread
        job_id = msg.job_id  # type: ignore[attr-defined]
        start, content, parts = jobs[job_id]
        if isinstance(msg, msgs.Partial) and msg.text:
            firsts.setdefault(job_id, time.perf_counter() - start)
            parts.append(msg.text)
        elif isinstance(msg, msgs.Final | msgs.Fail):
            results.append(Streamed(firsts.get(job_id, 0.0), time.perf_counter() - start,
                                    content, "".join(parts), len(parts), "in-process"))
            if len(results) == requests:
                done.set()
            submit()

    loop = BatchLoop(engine, send, lambda _: None)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    for _ in range(concurrency):
        submit()
    try:
        if not done.wait(600):
            raise RuntimeError(f"in-process: {len(results)} of {requests} streams ended")
    finally:
        loop.put(None)
        thread.join(30)
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
            row: dict[str, Any] = {"requests": requests, "inexact_streams": {
                k: received(v, tokens)["inexact_streams"] for k, v in runs.items()}}
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
    (the gateway merges what piles up into fewer, larger events)."""
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
        got = received(results, tokens)
        total = got["tokens_received"]
        events = sum(r.events for r in results)
        out[name] = {"streams": streams, "tokens_per_stream": tokens,
                     "engine_rate_per_stream": rate,
                     "offered_tokens_per_s": round(streams * rate),
                     "seconds": round(elapsed, 3), **got,
                     "tokens_received_per_s": round(total / elapsed),
                     "sse_events_per_s": round(events / elapsed),
                     "tokens_per_event": round(total / events, 2)}
    return out


def scaling(tmp: Path) -> dict[str, Any]:
    """ONE gateway (on node-0) takes all the load while the mesh has 1, 2 and 3 nodes, each
    one worker of 8 slots x 25 tokens/s = 200 tokens/s of capacity."""
    slots, rate, tokens = 8, 25.0, 50
    out: dict[str, Any] = {"node_capacity_tokens_per_s": slots * rate,
                           "tokens_per_request": tokens, "gateways": 1}
    for n in (1, 2, 3):
        cluster = Cluster(tmp / f"scaling-{n}", env={"MLX_STACK_QUEUE_SIZE": "10000"})
        try:
            cluster.broker()
            names = [f"node-{i}" for i in range(n)]
            for node in names:
                cluster.worker("--engine", "synthetic", "--model", "syn", "--slots",
                               str(slots), "--rate", str(rate), node=node)
            url = cluster.gateway(node=names[0])
            # Twice the mesh's seats, so every slot stays busy.
            results, elapsed = asyncio.run(load([url], 12 * slots * n, 2 * slots * n, tokens))
        finally:
            cluster.close()
        got = received(results, tokens)
        out[f"nodes_{n}"] = {
            "tokens_received_per_s": round(got["tokens_received"] / elapsed, 1),
            "seconds": round(elapsed, 2), **got,
            "streams_per_node": dict(sorted(Counter(r.node for r in results).items()))}
    for n in (2, 3):
        out[f"ratio_{n}_over_1"] = round(out[f"nodes_{n}"]["tokens_received_per_s"] /
                                         out["nodes_1"]["tokens_received_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="?", default="all",
                        choices=["overhead", "throughput", "scaling", "all"])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlxs-bench-"))
    runs = {"overhead": overhead, "throughput": throughput, "scaling": scaling}
    chosen = runs if args.which == "all" else {args.which: runs[args.which]}
    report = {"benchmark": "routing", "command": f".venv/bin/python -m bench.routing {args.which}",
              **provenance()}
    report.update({name: fn(tmp) for name, fn in chosen.items()})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
