"""What the tests assert and the benchmarks measure, written once for both: the exact
text the synthetic engine streams, the synthetic workers of a test mesh, and the
coordinator killed under streams.

A synthetic stream's whole text is known in advance (:func:`expected_text`), so a stream
that survived a failover is checked token for token, not just for having ended.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import statistics
import time
from collections.abc import Iterable

import httpx

from mlx_stack.worker.synthetic import next_token, word
from testkit.harness import Cluster, Mesh, Proc, healthy, wait_for
from testkit.sse import ChatStream, chat_body, read_chat

NODES = {"node-a": 2, "node-b": 1, "node-c": 0}
"""Three nodes and their priorities: node-a coordinates, node-b takes over from it."""


def expected_text(content: str, n: int) -> str:
    """The text the synthetic engine streams for ``n`` tokens after a chat of one user
    message ``content``: what an unbroken stream carries, failovers or not."""
    seq = list(content.encode())
    for _ in range(n):
        seq.append(next_token(seq))
    return "".join(word(t) for t in seq[len(content.encode()):])


def synthetic_workers(cluster: Cluster, *names: str, rate: float = 40, ttft: float = 0.0
                      ) -> dict[str, Proc]:
    """One registered synthetic worker of 2 slots on each node of ``names``, by node."""
    return {n: cluster.worker("--engine", "synthetic", "--model", "syn", "--rate", str(rate),
                              "--ttft", str(ttft), "--slots", "2", node=n) for n in names}


def start_nodes(mesh: Mesh, gateways: Iterable[str] = NODES, rate: float = 20.0
                ) -> dict[str, str]:
    """Two synthetic workers (40 slots each) on every node of :data:`NODES` and a gateway
    on each node of ``gateways``: their URLs, once each is healthy."""
    for node in NODES:
        for _ in range(2):
            mesh.start("worker", "--engine", "synthetic", "--model", "syn", "--slots", "40",
                       "--rate", str(rate), node=node)
    urls = {node: mesh.start_gateway(node) for node in gateways}
    for node, url in urls.items():
        wait_for(f"gateway {node}", lambda u=url: healthy(u), timeout=30)
    return urls


def failover_body(i: int, tokens: int) -> dict[str, object]:
    """Stream ``i`` of those that live through a broker's death."""
    return chat_body(f"failover {i}", tokens, usage=False)


def kill_coordinator_under_streams(mesh: Mesh, urls: list[str], streams: int,
                                   tokens: int) -> dict[str, float]:
    """Run ``streams`` synthetic streams over ``urls``; once all flow, SIGKILL node-a's
    broker (the coordinator). Asserts every stream equals its unbroken sequence; returns,
    over the streams, each one's stall: its longest wait between two tokens from the kill
    on, which is how long its client saw it stop (the tokens already on their way arrive
    in the first milliseconds after the kill, then the stream waits for its resubmission;
    an uninterrupted stream at 20 tokens/s still waits 0.05 s between tokens)."""

    async def main() -> tuple[list[ChatStream], float]:
        limits = httpx.Limits(max_connections=streams + 10)
        async with httpx.AsyncClient(timeout=60, limits=limits, headers=mesh.auth) as client:
            flowing = [asyncio.Event() for _ in range(streams)]
            tasks = [asyncio.create_task(read_chat(client, urls[i % len(urls)],
                                                   failover_body(i, tokens),
                                                   flowing=flowing[i]))
                     for i in range(streams)]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flowing)), 60)
            mesh.brokers["node-a"].kill(signal.SIGKILL)
            killed = time.perf_counter()
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=90), killed

    results, killed = asyncio.run(main())
    for i, stream in enumerate(results):
        assert stream.check().text == expected_text(f"failover {i}", tokens), i
    gaps = [max(b - a for a, b in itertools.pairwise(times))
            for times in ([t for t in s.content_arrivals if t > killed - 0.2] for s in results)
            if len(times) > 1]
    # None: every stream's text had come before the kill (a machine too slow to deliver
    # the streams as fast as they were generated); nothing was measured.
    assert gaps, "no stream was still flowing when the coordinator was killed"
    return {"streams": len(gaps), "min_s": round(min(gaps), 3),
            "median_s": round(statistics.median(gaps), 3),
            "p90_s": round(statistics.quantiles(gaps, n=10)[-1], 3),
            "max_s": round(max(gaps), 3)}


async def chaos_stream(client: httpx.AsyncClient, url: str, i: int, tokens: int,
                       into: ChatStream | None = None) -> ChatStream:
    """Stream ``i`` of a storm of faults, read to its end and asserted exactly as an
    unbroken run: its text, one ``[DONE]``, a "length" finish and the usage of
    ``tokens``. ``into``: where it is read (a test may look at it meanwhile)."""
    stream = (await read_chat(client, url, chat_body(f"chaos stream {i}", tokens),
                              into=into)).check()
    assert stream.text == expected_text(f"chaos stream {i}", tokens), i
    assert stream.dones == 1, (i, stream.dones)
    assert stream.finish_reasons == ["length"], (i, stream.finish_reasons)
    assert stream.usage["completion_tokens"] == tokens, (i, stream.usage)
    return stream
