"""Routing across a fleet (real processes, synthetic workers): balance, memory headroom,
the remote tie-breaker, and the routing history."""

from __future__ import annotations

import asyncio
import collections

import httpx
import openai

from testkit.harness import Cluster, wait_for

GIB = 1024**3


def synthetic(cluster: Cluster, node: str, slots: int, rate: float = 10.0,
              *extra: str) -> None:
    cluster.worker("--engine", "synthetic", "--model", "syn", "--slots", str(slots),
                   "--rate", str(rate), *extra, node=node)


async def burst(url: str, n: int, max_tokens: int) -> list[httpx.Response]:
    """``n`` requests at once (non-streamed), each ``max_tokens`` long."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json={
            "model": "syn", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"burst {i}"}]}) for i in range(n)))


def served_by(responses: list[httpx.Response]) -> collections.Counter[str]:
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return collections.Counter(r.headers["x-mlx-stack-node"] for r in responses)


def test_a_burst_of_60_splits_evenly_over_3_equal_workers(cluster: Cluster) -> None:
    for node in ("node-a", "node-b", "node-c"):
        synthetic(cluster, node, slots=30)
    url = cluster.gateway(node="node-a")
    counts = served_by(asyncio.run(burst(url, 60, 20)))
    assert set(counts) == {"node-a", "node-b", "node-c"}
    assert max(counts.values()) - min(counts.values()) <= 2, counts  # each 20 +- 1
    routes = cluster.control("routes", last=60)
    assert len(routes) == 60 and all(len(r.candidates) == 3 for r in routes)
    assert all(r.outcome == "ok" for r in routes)


def test_less_free_memory_gets_less_work(cluster: Cluster) -> None:
    """End to end, the split that tests/test_routing_score.py derives from the weights:
    the roomy worker runs two jobs more (memory weighs ~2 jobs here, not a veto)."""
    synthetic(cluster, "roomy", 10, 10.0, "--mem-total-gb", "16", "--mem-free-gb", "14")
    synthetic(cluster, "tight", 10, 10.0, "--mem-total-gb", "16", "--mem-free-gb", "2")
    url = cluster.gateway(node="elsewhere")  # both workers equally remote
    counts = served_by(asyncio.run(burst(url, 16, 20)))
    assert counts == {"roomy": 9, "tight": 7}, counts


def test_the_remote_penalty_only_breaks_ties(cluster: Cluster) -> None:
    synthetic(cluster, "node-a", slots=10, rate=20.0)
    synthetic(cluster, "node-b", slots=10, rate=20.0)
    url = cluster.gateway(node="node-a")
    # One at a time, the two workers tie on load and memory: the local one wins.
    for _ in range(4):
        assert served_by(asyncio.run(burst(url, 1, 2))) == {"node-a": 1}

    # One job running on the local worker outweighs the remote penalty: the next job goes
    # to the idle remote worker (with a remote weight 100x larger it would stay local).
    async def one_running_then_another() -> tuple[str, str]:
        async with httpx.AsyncClient(timeout=60) as client:
            long = asyncio.create_task(client.post(f"{url}/v1/chat/completions", json={
                "model": "syn", "max_tokens": 60,
                "messages": [{"role": "user", "content": "long"}]}))
            await asyncio.to_thread(wait_for, "the long job to be dispatched",
                                    lambda: sum(w.running for w in cluster.workers()) == 1,
                                    10)
            short = await client.post(f"{url}/v1/chat/completions", json={
                "model": "syn", "max_tokens": 2,
                "messages": [{"role": "user", "content": "short"}]})
            return (await long).headers["x-mlx-stack-node"], short.headers["x-mlx-stack-node"]

    assert asyncio.run(one_running_then_another()) == ("node-a", "node-b")


def test_routing_history_has_scores_choice_and_wait(cluster: Cluster) -> None:
    synthetic(cluster, "node-a", slots=2)
    url = cluster.gateway(node="node-a")
    asyncio.run(burst(url, 3, 5))
    routes = cluster.control("routes", last=5)
    assert len(routes) == 3
    for route in routes:
        assert route.job_id and route.worker_id.startswith(route.node_id) and route.retries == 0
        assert route.model == "syn" and route.outcome == "ok"
        assert route.candidates[0].score >= 0
    assert max(r.queue_wait_ms for r in routes) > 100  # the third waited for a slot


def test_one_request_id_names_a_request_from_http_to_the_worker(cluster: Cluster) -> None:
    worker = cluster.start("worker", "--engine", "synthetic", "--model", "syn",
                           env={"MLX_STACK_LOG_LEVEL": "debug"})
    wait_for("the worker to register", cluster.workers)
    client = openai.OpenAI(base_url=f"{cluster.gateway()}/v1", api_key="none", max_retries=0)
    given = client.chat.completions.with_raw_response.create(
        model="syn", max_tokens=3, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-request-id": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    assert given.parse().id == "chatcmpl-trace-42"
    with client.chat.completions.with_streaming_response.create(
            model="syn", max_tokens=3, stream=True,
            messages=[{"role": "user", "content": "hi"}]) as made:
        made_id = made.headers["x-request-id"]
        assert len(made_id) == 32 and all(c.id == f"chatcmpl-{made_id}" for c in made.parse())
    routes = cluster.control("routes", last=2)
    assert [r.request_id for r in routes] == ["trace-42", made_id]
    wait_for("the worker to log both", lambda: "request=trace-42" in worker.output()
             and f"request={made_id}" in worker.output())
