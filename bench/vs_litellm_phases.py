"""The four phases of ``bench.vs_litellm``, each on fresh processes: the time to first token
a router adds over the HTTP baseline (concurrency 1 and a steady 32), the tokens/s
ceiling and the router's CPU, a burst of 60 streams, and backends killed under load
(``run_all`` runs them all against each system).

Why a module of its own: the measuring, apart from the systems measured
(``bench.vs_litellm_systems``) and from what the report makes of the results
(``bench.vs_litellm_report``); ``bench.c32_tail`` measures the steady concurrency of 32
with the same :func:`steady`.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.routing import Streamed, interleaved, load, pct
from bench.vs_litellm_systems import (
    BACKENDS,
    RATE,
    SLOTS,
    STRATEGIES,
    TOKENS,
    TTFT,
    Systems,
    cpu,
)
from testkit.harness import Proc
from testkit.scenarios import expected_text
from testkit.sse import chat_body, read_chat


def ttft_ms(runs: list[Streamed], q: float) -> float:
    """The ``q`` quantile of the streams' time to first token (those that had one)."""
    return round(pct([r[0] for r in runs if r[0] > 0], q) * 1000, 3)


ROUNDS, ROUND_STREAMS = 6, 480
"""Turns the router and the baseline take at concurrency 32, and streams per turn."""
STREAM_S = TTFT + TOKENS / RATE
"""How long one latency-phase stream lasts: the ramp over which a round's first 32 start,
so that the round is a steady load of 32, not bursts of 32 (the burst phase has those)."""


def steady(systems: dict[str, list[str]], rounds: int = ROUNDS) -> dict[str, list[Streamed]]:
    """Each system's streams at a steady concurrency of 32: the systems take turns in
    ``rounds`` rounds of :data:`ROUND_STREAMS`, the first to go alternating, each round's
    first 32 starting spread over :data:`STREAM_S`. A system's urls (several gateways)
    get its streams round-robin."""
    runs: dict[str, list[Streamed]] = {name: [] for name in systems}
    for turn in range(rounds):
        for name, urls in list(systems.items())[::1 if turn % 2 == 0 else -1]:
            runs[name] += asyncio.run(load(urls, ROUND_STREAMS, 32, TOKENS,
                                           ramp=STREAM_S))[0]
    return runs


def overhead(url: str, base: str) -> dict[str, Any]:
    """Time to first token through the router at ``url`` and of the baseline at ``base``,
    in the same minutes: ``{"router": {"c1": ..., "c32": ...}, "baseline": ...}``."""
    runs: dict[str, dict[str, list[Streamed]]] = {"router": {}, "baseline": {}}
    runs["router"]["c1"], runs["baseline"]["c1"] = asyncio.run(interleaved([url, base], 200,
                                                                           TOKENS))
    for name, c32 in steady({"router": [url], "baseline": [base]}).items():
        runs[name]["c32"] = c32
    return {name: {c: {"ttft_ms_p50": ttft_ms(r, 0.5), "ttft_ms_p99": ttft_ms(r, 0.99)}
                   for c, r in by_c.items()} for name, by_c in runs.items()}


def ceiling(url: str, router: list[Proc]) -> dict[str, Any]:
    """Every slot busy: the tokens/s the router delivers and its CPU per 1,000 tokens."""
    concurrency, tokens = BACKENDS * SLOTS, 64
    before = cpu(router)
    runs, seconds = asyncio.run(load([url], concurrency * 3, concurrency, tokens))
    used = cpu(router) - before
    delivered = sum(len(r.text.split()) for r in runs)  # a synthetic token is one word
    return {"concurrency": concurrency, "tokens_per_s": round(delivered / seconds, 1),
            "inexact_streams": sum(r.text != expected_text(r.content, tokens) for r in runs),
            "router_cpu_s_per_1k_tokens": round(used / delivered * 1000, 4),
            "engine_ceiling_tokens_per_s": BACKENDS * SLOTS * RATE}


BURST = 60


def burst(url: str) -> list[Streamed]:
    """:data:`BURST` long streams (2 s) at once."""
    return asyncio.run(load([url], BURST, BURST, 100))[0]


def spread(split: list[int], runs: list[Streamed]) -> dict[str, Any]:
    """How the burst was split across backends, and how long its streams waited for their
    first token (all arrive at once: how fast the router takes them in)."""
    return {"streams": BURST, "per_backend": split, "spread": max(split) - min(split),
            "ttft_ms_p50": ttft_ms(runs, 0.5), "ttft_ms_max": ttft_ms(runs, 1.0)}


async def storm(url: str, n: int, tokens: int, first: int, kill: Any) -> dict[str, int]:
    """``n`` streams; ``kill()`` once all have had a token. Outcome counts."""
    flowing = [asyncio.Event() for _ in range(n)]
    outcome = {"completed": 0, "failed": 0, "hung": 0, "wrong": 0}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        content = f"failure stream {first + i}"
        try:
            async with asyncio.timeout(60):
                stream = await read_chat(client, url, chat_body(content, tokens, usage=False),
                                         flowing=flowing[i])
            text = stream.check().text  # a refusal or an error event: StreamFailed
            outcome["completed" if text == expected_text(content, tokens) else "wrong"] += 1
        except TimeoutError:
            outcome["hung"] += 1
        except (httpx.HTTPError, RuntimeError, json.JSONDecodeError):
            outcome["failed"] += 1
        finally:
            flowing[i].set()

    async with httpx.AsyncClient(timeout=90, limits=httpx.Limits(
            max_connections=n + 8)) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(n)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flowing)), 60)
        if kill is not None:
            kill()
        await asyncio.gather(*tasks)
    return outcome


def failures(url: str, victims: list[Proc], load_of: Callable[[], list[int]]
             ) -> dict[str, Any]:
    """Kill the backend that carries the most streams (``load_of()``: how many each of
    ``victims`` has taken so far) once all 30 flow; then kill another one, idle, and send
    30 more."""
    before = load_of()
    chosen: list[int] = []

    def kill_busiest() -> None:
        taken = [a - b for a, b in zip(load_of(), before, strict=True)]
        chosen.append(taken.index(max(taken)))
        victims[chosen[0]].kill(signal.SIGKILL)

    mid = asyncio.run(storm(url, 30, 120, 0, kill_busiest))
    idle = next(v for i, v in enumerate(victims) if i != chosen[0])
    idle.kill(signal.SIGKILL)
    idle.popen.wait(10)
    after = asyncio.run(storm(url, 30, 40, 30, None))
    return {"killed_mid_stream": mid, "after_an_idle_kill": after}


def run_all(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    systems = Systems(tmp)
    try:
        base, _ = systems.backend()

        def backends() -> tuple[list[str], list[Proc]]:
            started = [systems.backend() for _ in range(BACKENDS)]
            return [u for u, _ in started], [p for _, p in started]

        for strategy in STRATEGIES:
            urls, procs = backends()
            router_url, router = systems.litellm(urls, strategy)

            def counts(urls: list[str] = urls) -> list[int]:
                return [httpx.get(f"{u}/stats", timeout=5).json()["started"] for u in urls]

            result = {**overhead(router_url, base), "ceiling": ceiling(router_url, router)}
            before = counts()
            runs = burst(router_url)
            result["burst"] = spread([a - b for a, b in zip(counts(), before, strict=True)],
                                     runs)
            result["failures"] = failures(router_url, procs, counts)
            out[f"litellm-{strategy}"] = result

        cluster, (url,), router, workers = systems.mesh()
        result = {**overhead(url, base), "ceiling": ceiling(url, router)}
        runs = burst(url)
        routes = cluster.control("routes", last=BURST)
        result["burst"] = spread([sum(r.worker_id == w.worker_id for r in routes)
                                  for w in cluster.workers()], runs)
        ids = [w.worker_id for w in cluster.workers()]  # in the order they registered

        def jobs(ids: list[str] = ids) -> list[int]:
            running = {w.worker_id: w.running for w in cluster.workers()}
            return [running.get(i, 0) for i in ids]

        result["failures"] = failures(url, workers, jobs)
        out["mesh"] = result
    finally:
        systems.close()
    return out
