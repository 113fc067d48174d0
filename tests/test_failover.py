"""No request is lost to a dead or stalled worker, or to a broker restart (real processes,
SIGKILL/SIGSTOP; synthetic workers, so the exact expected stream is known)."""

from __future__ import annotations

import signal
import time

import httpx
import openai
import pytest

from mlx_stack.worker.synthetic import FAULT
from testkit.harness import Cluster, free_port, wait_for
from testkit.scenarios import expected_text, synthetic_workers
from testkit.sse import BackgroundStream


def test_worker_killed_mid_stream_the_stream_continues_exactly(cluster: Cluster) -> None:
    workers = synthetic_workers(cluster, "node-a", "node-b")
    url = cluster.gateway()
    stream = BackgroundStream(url, "tell me a story", 60).start()
    wait_for("some tokens", lambda: len(stream.text.split()) >= 10)
    workers[stream.headers["x-mlx-stack-node"]].kill(signal.SIGKILL)
    stream.wait()
    assert stream.text == expected_text("tell me a story", 60)
    usage = stream.chunks[-1]["usage"]
    assert usage["completion_tokens"] == 60
    assert usage["prompt_tokens"] == len(b"tell me a story")
    assert [c["choices"][0]["finish_reason"] for c in stream.chunks if c.get("choices")
            ][-1] == "length"


def test_stalled_worker_is_purged_and_the_job_runs_elsewhere(cluster: Cluster) -> None:
    """A worker frozen before its first token (SIGSTOP) is purged and the job re-dispatched;
    when it thaws, its late output for the old attempt is ignored."""
    workers = synthetic_workers(cluster, "node-a", "node-b", ttft=1.5)
    url = cluster.gateway()
    stream = BackgroundStream(url, "frozen", 20).start()
    assert stream.first.wait(30)
    frozen = workers[stream.headers["x-mlx-stack-node"]]
    frozen.kill(signal.SIGSTOP)
    try:
        wait_for("the frozen worker to be purged", lambda: len(cluster.workers()) == 1)
    finally:
        frozen.kill(signal.SIGCONT)
    stream.wait()
    assert stream.text == expected_text("frozen", 20)
    wait_for("the thawed worker to register again", lambda: len(cluster.workers()) == 2)


def test_broker_restart_mid_stream_resumes_every_stream(cluster: Cluster) -> None:
    synthetic_workers(cluster, "node-a", "node-b", rate=30)
    url = cluster.gateway()
    streams = [BackgroundStream(url, f"stream {i}", 45).start() for i in range(4)]
    wait_for("tokens on every stream", lambda: all(len(s.text.split()) >= 5 for s in streams))
    cluster.procs[0].kill(signal.SIGKILL)  # the broker
    cluster.broker()
    for i, s in enumerate(streams):
        s.wait()
        assert s.text == expected_text(f"stream {i}", 45)


def test_engine_error_is_a_500_at_once_not_retried(cluster: Cluster) -> None:
    synthetic_workers(cluster, "node-a", "node-b")
    url = cluster.gateway()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="syn", messages=[
            {"role": "user", "content": f"please {FAULT}"}])
    assert info.value.status_code == 500
    assert "synthetic engine error" in info.value.body["message"]
    (route,) = cluster.control("routes", last=1)
    assert route.retries == 0 and route.outcome == "failed"


def test_no_broker_is_a_503_after_the_grace_period(tmp_path) -> None:
    c = Cluster(tmp_path, env={"MLX_STACK_GRACE": "1",
                               "MLX_STACK_BROKER_ENDPOINT": f"tcp://127.0.0.1:{free_port()}"})
    try:
        url = c.gateway(healthy=False)
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "syn", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_broker"
        assert "no broker answers" in response.json()["error"]["message"]
        assert 1.0 <= time.monotonic() - started < 10
    finally:
        c.close()


def test_a_request_past_its_deadline_is_a_504_and_frees_its_slot(tmp_path) -> None:
    c = Cluster(tmp_path, env={"MLX_STACK_REQUEST_TIMEOUT": "1"})
    try:
        c.broker()
        synthetic_workers(c, "node-a", ttft=60)  # never answers within the deadline
        url = c.gateway()
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "syn", "messages": [{"role": "user", "content": "slow"}]})
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert error["type"] == "timeout_error" and error["code"] == "deadline_exceeded"
        assert "1 s" in error["message"]
        assert time.monotonic() - started < 30
        wait_for("the expired job to leave its worker",
                 lambda: c.workers()[0].running == 0, timeout=10)
    finally:
        c.close()


def test_when_retries_run_out_the_stream_ends_with_an_error_not_a_hang(tmp_path) -> None:
    """max_retries = 1: the stream survives its first worker, and when the second dies
    too it ends with an OpenAI error event naming the attempts (and no [DONE])."""
    c = Cluster(tmp_path, env={"MLX_STACK_MAX_RETRIES": "1"})
    try:
        c.broker()
        workers = synthetic_workers(c, "node-a", "node-b", rate=20)
        url = c.gateway(node="node-a")
        s = BackgroundStream(url, "doomed", 400).start()
        wait_for("tokens from the first worker", lambda: len(s.chunks) >= 3)
        first = s.headers["x-mlx-stack-node"]
        workers[first].kill(signal.SIGKILL)
        seen = len(s.chunks)
        wait_for("tokens from the second worker", lambda: len(s.chunks) >= seen + 3)
        workers[next(n for n in workers if n != first)].kill(signal.SIGKILL)
        wait_for("the stream to end", lambda: s.closed or s.error, timeout=30)
        assert s.error is None and not s.done, s.error
        errors = [chunk["error"] for chunk in s.chunks if "error" in chunk]
        assert len(errors) == 1 and errors[0]["code"] == "worker_lost", errors
        assert "gave up after 2 workers were lost" in errors[0]["message"]
    finally:
        c.close()


def test_broker_restarts_never_use_up_a_requests_retries(tmp_path) -> None:
    """max_retries = 1, and the broker is SIGKILLed and restarted three times under one
    stream: losses that are the mesh's doing cost the request time, not attempts, and the
    stream ends with its exact text."""
    c = Cluster(tmp_path, env={"MLX_STACK_MAX_RETRIES": "1"})
    try:
        broker = c.broker()
        synthetic_workers(c, "node-a", rate=20)
        s = BackgroundStream(c.gateway(), "outlives its brokers", 120).start()
        for restart in range(3):
            seen = len(s.text.split())
            wait_for(f"tokens before restart {restart}",
                     lambda n=seen: len(s.text.split()) >= n + 3 or s.closed, timeout=30)
            assert not s.closed, s.chunks[-1]  # it ended early: an error event
            broker.kill(signal.SIGKILL)
            broker = c.broker()
        s.wait(timeout=90)
        assert s.text == expected_text("outlives its brokers", 120)
    finally:
        c.close()


def test_streams_go_direct_to_a_reachable_gateway_and_through_the_broker_otherwise(
        cluster: Cluster) -> None:
    """node-a's worker streams straight to node-a's gateway. node-b's worker cannot reach
    it (loopback names another machine, as far as the broker knows): its output goes
    through the broker. Every stream is exact."""
    procs = synthetic_workers(cluster, "node-a", "node-b", rate=400)
    url = cluster.gateway(node="node-a")
    # Both workers' slots:
    streams = [BackgroundStream(url, f"way {i}", 12).start() for i in range(8)]
    for stream in streams:
        stream.wait()
        assert stream.text == expected_text(stream.content, 12)
    wait_for("the workers' next heartbeats", lambda: sum(
        w.load.counters.get("jobs_started", 0) for w in cluster.workers()) >= 8)
    ways = {w.node_id: (w.load.counters.get("jobs_direct", 0),
                        w.load.counters.get("jobs_relayed", 0))
            for w in cluster.workers()}
    # (A first job may go through the broker: the connection to the gateway opens with
    # it, and its first message may leave before the connection is up.)
    assert ways["node-a"][0] >= 2, ways
    assert ways["node-b"][0] == 0 and ways["node-b"][1] > 0, ways
    assert all(p.alive() for p in procs.values())


def test_a_worker_lost_before_its_heartbeat_told_of_direct_output_is_resumed(
        tmp_path) -> None:
    """The output went straight to the gateway, and the worker died before its first
    heartbeat (3 s after it started) told the coordinator: the coordinator takes the job
    for one that sent nothing and runs it again from its start. The gateway, which sent
    the client output, sees the new dispatch and resumes the job from there instead."""
    interval = 3.0
    cluster = Cluster(tmp_path, env={"MLX_STACK_HEARTBEAT_INTERVAL": str(interval),
                                     "MLX_STACK_HEARTBEAT_LIVENESS": "2"})
    try:
        cluster.broker()
        (worker,) = synthetic_workers(cluster, "node-a", rate=20).values()
        url = cluster.gateway()
        # One request first: the worker's connection to the gateway is then up, and the
        # stream below goes direct.
        assert httpx.post(f"{url}/v1/completions", timeout=30, json={
            "model": "syn", "prompt": "warm", "max_tokens": 1}).status_code == 200
        # Start right after a heartbeat (it carries the counters the warm-up changed):
        # the next one, which would tell of the direct output, is a whole interval away.
        wait_for("a heartbeat of the worker just now", lambda: any(
            w.load.counters.get("jobs_done") and w.last_heartbeat_s < 0.3
            for w in cluster.workers()), timeout=3 * interval)
        beat = time.monotonic()
        stream = BackgroundStream(url, "quick now", 30).start()
        wait_for("a token", lambda: stream.text)
        worker.kill(signal.SIGKILL)
        assert time.monotonic() - beat < interval, "the stream took a heartbeat interval"
        synthetic_workers(cluster, "node-b", rate=20)
        stream.wait()
        assert stream.text == expected_text("quick now", 30)
        assert cluster.control("status").counters.get("redispatched") == 1
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'mlx_stack_failovers_total{kind="mid_stream"} 1.0' in metrics
    finally:
        cluster.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_while_its_job_waits_cancels_it(
        cluster: Cluster, stream: bool) -> None:
    """Gone while its job waits in the queue (the one slot is taken), the client must not
    get a worker's slot later: its job is cancelled. Streamed or not, the gateway has not
    answered yet then."""
    cluster.worker("--engine", "synthetic", "--model", "syn", "--ttft", "60", "--slots", "1")
    url = cluster.gateway()
    busy = BackgroundStream(url, "the slot", 5).start()
    assert busy.first.wait(10) and busy.headers, busy.error
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", timeout=1.0, json={
            "model": "syn", "max_tokens": 5, "stream": stream,
            "messages": [{"role": "user", "content": "never mind"}]})
    wait_for("the broker to cancel the waiting job", lambda: cluster.control(
        "status").counters.get("cancelled", 0) == 1, timeout=20)
