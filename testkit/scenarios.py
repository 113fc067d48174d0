"""Scenarios the tests and the benchmarks share (moved from tests/test_failover.py,
tests/test_coordinator.py and tests/test_chaos.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import statistics
import time

import httpx

from testkit.harness import Cluster, Mesh, Proc
from worker.synthetic import next_token, word

NODES = {"node-a": 2, "node-b": 1, "node-c": 0}
TOKENS = 40


def expected_text(content: str, n: int) -> str:
    seq = list(content.encode())
    for _ in range(n):
        seq.append(next_token(seq))
    return "".join(word(t) for t in seq[len(content.encode()):])


def nodes(cluster: Cluster, *names: str, rate: float = 40, ttft: float = 0.0
          ) -> dict[str, Proc]:
    return {n: cluster.worker("--engine", "synthetic", "--model", "syn", "--rate", str(rate),
                              "--ttft", str(ttft), "--slots", "2", node=n) for n in names}


async def stream(client: httpx.AsyncClient, url: str, i: int, tokens: int,
                 arrivals: list[float], flowing: asyncio.Event) -> str:
    text = []
    async with client.stream(
            "POST", f"{url}/v1/chat/completions", json={
                "model": "syn", "max_tokens": tokens, "stream": True,
                "messages": [{"role": "user", "content": f"failover {i}"}]}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    arrivals.append(time.monotonic())
                    flowing.set()
                    text.append(chunk["choices"][0]["delta"]["content"])
    return "".join(text)


def kill_coordinator_under_streams(mesh: Mesh, urls: list[str], streams: int,
                                   tokens: int) -> dict[str, float]:
    """Run ``streams`` synthetic streams over ``urls``; once all flow, SIGKILL node-a's
    broker (the coordinator). Asserts every stream equals its unbroken sequence; returns,
    over the streams, each one's stall: its longest wait between two tokens from the kill
    on, which is how long its client saw it stop (the tokens already on their way arrive
    in the first milliseconds after the kill, then the stream waits for its resubmission;
    an uninterrupted stream at 20 tokens/s still waits 0.05 s between tokens)."""
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    killed: list[float] = []

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=streams + 10)
        async with httpx.AsyncClient(timeout=60, limits=limits, headers=mesh.auth) as client:
            flowing = [asyncio.Event() for _ in range(streams)]
            tasks = [asyncio.create_task(stream(client, urls[i % len(urls)], i, tokens,
                                                arrivals[i], flowing[i]))
                     for i in range(streams)]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flowing)), 60)
            mesh.brokers["node-a"].kill(signal.SIGKILL)
            killed.append(time.monotonic())
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)

    texts = asyncio.run(main())
    for i, text in enumerate(texts):
        assert text == expected_text(f"failover {i}", tokens), i
    gaps = [max(b - a for a, b in itertools.pairwise(times))
            for times in ([t for t in arr if t > killed[0] - 0.2] for arr in arrivals)
            if len(times) > 1]
    return {"streams": len(gaps), "min_s": round(min(gaps), 3),
            "median_s": round(statistics.median(gaps), 3),
            "p90_s": round(statistics.quantiles(gaps, n=10)[-1], 3),
            "max_s": round(max(gaps), 3)}


async def one(client: httpx.AsyncClient, url: str, i: int,
              tokens: int = TOKENS) -> tuple[str, list[str], dict]:
    """(text, finish reasons, usage) of stream ``i``; raises on any error."""
    content = f"chaos stream {i}"
    text: list[str] = []
    finishes: list[str] = []
    usage: dict = {}
    done = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json={
            "model": "syn", "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": content}]}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done += 1
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    text.append(choice["delta"].get("content") or "")
                    if choice["finish_reason"]:
                        finishes.append(choice["finish_reason"])
    assert done == 1
    return "".join(text), finishes, usage
