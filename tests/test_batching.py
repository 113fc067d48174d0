"""Continuous batching with the real model: many streams on one worker, a cancelled
stream leaving the batch, a worker killed under a full batch, and the prompt cache.

The worker decodes every running request together (mlx-lm's BatchGenerator), so at
temperature 0 each stream must give exactly the text it gives alone, and a stream resumed
on another worker after a SIGKILL must give the text of an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mlx_stack.common.status import WorkerStatus
from testkit.harness import Cluster, Proc, close_and_report, wait_for

pytestmark = pytest.mark.model
TOPICS = ["the sea", "a lost cat", "a rocket", "fresh bread", "winter", "a small robot",
          "a violin", "an old oak tree"]


def story(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a short story about {topic}."}]


@dataclass
class Streamed:
    text: str
    worker: str
    ttft: float
    first_at: float
    """When the first text arrived (monotonic seconds)."""
    end_at: float
    usage: Any


def stream(client: openai.OpenAI, model: str, messages: list[dict[str, str]],
           max_tokens: int, on_chunk: Any = None) -> Streamed:
    """One streamed chat completion at temperature 0; ``on_chunk(n)`` after each chunk."""
    sent = time.monotonic()
    first = None
    parts: list[str] = []
    usage = None
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True}) as response:
        worker = response.headers["x-mlx-stack-worker"]
        for n, chunk in enumerate(response.parse(), 1):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                parts.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
            if on_chunk:
                on_chunk(n)
    first = first or time.monotonic()
    return Streamed("".join(parts), worker, first - sent, first, time.monotonic(), usage)


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=180)


def start_worker(cluster: Cluster, *args: str, env: dict[str, str] | None = None
                 ) -> tuple[Proc, str]:
    """A real worker and the id the broker knows it by."""
    before = {w.worker_id for w in cluster.workers()}
    proc = cluster.worker(*args, env=env)
    (worker_id,) = {w.worker_id for w in cluster.workers()} - before
    return proc, worker_id


@dataclass
class Pair:
    """Two real workers that both answer to ``pair``: ``cached`` (prompt cache on) and
    ``uncached`` (prompt cache off), behind one gateway."""

    cluster: Cluster
    url: str
    client: openai.OpenAI
    procs: dict[str, Proc]
    """Worker process by worker id."""
    ids: dict[str, str]
    """Worker id by tier (cached, uncached)."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
         request: pytest.FixtureRequest) -> Iterator[Pair]:
    c = Cluster(tmp_path_factory.mktemp("batching"),
                env={"MLX_STACK_MODELS_DIR": str(models_dir)})
    try:
        c.broker()
        cached = start_worker(c, "--model", "default=pair,cached")
        uncached = start_worker(c, "--model", "default=pair,uncached",
                                env={"MLX_STACK_PROMPT_CACHE_BYTES": "0"})
        url = c.gateway()
        yield Pair(c, url, client_for(url), dict([cached[::-1], uncached[::-1]]),
                   {"cached": cached[1], "uncached": uncached[1]})
    finally:
        close_and_report(c, request.node)


def worker_status(cluster: Cluster, worker_id: str) -> WorkerStatus:
    return next(w for w in cluster.workers() if w.worker_id == worker_id)


def test_eight_streams_on_one_worker_each_equal_to_its_run_alone(pair: Pair) -> None:
    """Eight streams at once on one worker: all run together (every first token comes
    before any stream ends) and each text equals the same request run alone."""
    assert worker_status(pair.cluster, pair.ids["cached"]).slots == 8
    alone = [stream(pair.client, "cached", story(t), 24).text for t in TOPICS]
    with cf.ThreadPoolExecutor(len(TOPICS)) as pool:
        together = list(pool.map(lambda t: stream(pair.client, "cached", story(t), 24), TOPICS))
    assert [s.text for s in together] == alone
    assert {s.worker for s in together} == {pair.ids["cached"]}
    assert max(s.first_at for s in together) < min(s.end_at for s in together)


def test_a_seeded_sample_is_the_same_inside_a_batch_as_alone(pair: Pair) -> None:
    """Each request samples from its own PRNG key: a seed gives the same text whatever
    runs beside it, and sampling is not greedy decoding."""
    def sample(seed: int) -> str:
        return pair.client.chat.completions.create(
            model="cached", messages=story("a dragon"), temperature=1.0, top_p=0.95,
            seed=seed, max_tokens=24).choices[0].message.content

    alone = sample(7)
    with cf.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(stream, pair.client, "cached", story(t), 48) for t in TOPICS[:3]]
        in_batch = pool.submit(sample, 7).result(timeout=120)
        assert all(f.result(timeout=120).usage.completion_tokens == 48 for f in others)
    greedy = stream(pair.client, "cached", story("a dragon"), 24).text
    assert in_batch == alone
    assert len({alone, sample(8), greedy}) == 3


def test_a_cancelled_stream_frees_its_seat_at_once_and_the_others_go_on(pair: Pair) -> None:
    cluster, worker_id = pair.cluster, pair.ids["cached"]
    before = worker_status(cluster, worker_id).load.counters.get("jobs_cancelled", 0)
    leave = threading.Event()

    def leaver() -> None:
        with pair.client.chat.completions.with_streaming_response.create(
                model="cached", messages=story("a long journey"), temperature=0.7,
                max_tokens=400, stream=True) as response:
            for n, _ in enumerate(response.parse()):
                if n >= 3:
                    leave.set()
                    return  # the client goes away mid-stream

    with cf.ThreadPoolExecutor(5) as pool:
        stayers = [pool.submit(stream, pair.client, "cached", story(t), 120)
                   for t in TOPICS[:4]]
        pool.submit(leaver)
        assert leave.wait(120)

        def seat_freed() -> bool:
            status = worker_status(cluster, worker_id)
            return (status.load.counters.get("jobs_cancelled", 0) > before
                    and status.running == 4)

        wait_for("the cancelled stream to leave the batch", seat_freed, timeout=30)
        assert not any(f.done() for f in stayers), "the others should still be running"
        results = [f.result(timeout=180) for f in stayers]
    assert all(r.usage.completion_tokens == 120 for r in results)


def test_second_turn_reuses_the_prompt_cache_and_answers_the_same(pair: Pair) -> None:
    """An agent's next turn resends its whole history: only the new tokens are prefilled
    (so its first token comes sooner), and the answer equals a worker without a cache."""
    cluster, worker_id = pair.cluster, pair.ids["cached"]
    rules = " ".join(f"Rule {i}: keep answers short, polite and about gardening only."
                     for i in range(60))
    history = [{"role": "system", "content": f"You are a helpful gardener. {rules}"},
               {"role": "user", "content": "What should I plant in spring?"}]

    def done(jobs: int) -> Callable[[WorkerStatus], bool]:
        return lambda w: w.load.counters.get("jobs_done", 0) >= jobs

    # From a heartbeat sent with no job running (the test before ends its own streams).
    idle = cluster.counters_when(lambda w: w.running == 0 and w.load.running == 0,
                                 worker_id)
    first = stream(pair.client, "cached", history, 16)
    history += [{"role": "assistant", "content": first.text},
                {"role": "user", "content": "And in autumn?"}]
    counters = cluster.counters_when(done(idle.get("jobs_done", 0) + 1), worker_id)
    second = stream(pair.client, "cached", history, 16)
    after = cluster.counters_when(done(counters["jobs_done"] + 1), worker_id)
    reused = after["prompt_tokens_reused"] - counters["prompt_tokens_reused"]
    computed = after["prompt_tokens_computed"] - counters["prompt_tokens_computed"]
    assert reused >= first.usage.prompt_tokens and computed < 40, (reused, computed)
    # The client reads the same count, as OpenAI reports its own prompt cache.
    assert second.usage.prompt_tokens_details.cached_tokens == reused
    assert second.ttft < first.ttft  # ~800 prompt tokens less to prefill
    assert stream(pair.client, "uncached", history, 16).text == second.text
    metrics = httpx.get(f"{pair.url}/metrics", timeout=10).text
    hits = re.search(r'^mlx_stack_prompt_cache_hits_total\{model="SmolLM2-135M-Instruct"\} '
                     r"(\S+)$", metrics, re.M)
    assert hits and float(hits[1]) >= 1, metrics


def test_worker_killed_under_eight_streams_every_stream_resumes_exactly(pair: Pair) -> None:
    """Eight streams over two workers; one worker is SIGKILLed once every stream has
    text: each stream finishes on the survivor with the text of an uninterrupted run."""
    with cf.ThreadPoolExecutor(len(TOPICS)) as pool:  # a batch gives each text alone
        reference = dict(zip(TOPICS, pool.map(
            lambda t: stream(pair.client, "cached", story(t), 40).text, TOPICS), strict=True))
    started = threading.Barrier(len(TOPICS) + 1, timeout=120)

    def on_chunk(n: int) -> None:
        if n == 3:
            started.wait()

    with cf.ThreadPoolExecutor(len(TOPICS)) as pool:
        futures = {t: pool.submit(stream, pair.client, "pair", story(t), 40, on_chunk)
                   for t in TOPICS}
        started.wait()
        victim = pair.ids["cached"]
        pair.procs[victim].kill(signal.SIGKILL)
        results = {t: f.result(timeout=180) for t, f in futures.items()}
    assert not pair.procs[victim].alive()
    assert any(r.worker == victim for r in results.values())
    assert {t: r.text for t, r in results.items()} == reference
    assert all(r.usage.completion_tokens == 40 for r in results.values())
    # Failed over: the coordinator failed a job as worker_lost, or, when the worker died
    # before its heartbeat told of the output that went straight to the gateway, ran it
    # again from the start (a retry) and the gateway resumed it instead.
    routes = pair.cluster.control("routes", last=20)
    assert any(r.outcome == "worker_lost" or r.retries >= 1 for r in routes), [
        (r.job_id[:8], r.worker_id, r.outcome, r.retries) for r in routes]
