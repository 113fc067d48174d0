"""The broker with real processes and sockets (synthetic workers: these test routing)."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable

import httpx
import msgpack
import openai
import pytest
import zmq

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.config import Settings
from mlx_stack.common.control import ControlClient, ControlError
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.plain import INT_MAX
from testkit.harness import Cluster, wait_for


@pytest.fixture
def dealer(cluster: Cluster) -> Callable[[], zmq.Socket]:
    """Makes raw DEALERs connected to the broker. They are kept here, so that one used
    once (``dealer().send(...)``) is not garbage-collected, and closed before sending;
    the cluster's context closes them all, even when the test fails."""
    sockets: list[zmq.Socket] = []

    def connect() -> zmq.Socket:
        sock = cluster.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cluster.endpoint)
        sockets.append(sock)
        return sock

    return connect


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def chat(url: str, model: str = "syn", max_tokens: int = 5, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}], **kw})


def test_idle_worker_killed_is_purged_and_next_request_goes_to_a_live_one(
        cluster: Cluster) -> None:
    doomed = cluster.worker("--engine", "synthetic", "--model", "syn")
    survivor = cluster.worker("--engine", "synthetic", "--model", "syn")
    url = cluster.gateway()
    ids = {w.worker_id for w in cluster.workers()}
    assert len(ids) == 2
    doomed.kill(signal.SIGKILL)
    killed = time.monotonic()
    wait_for("the killed worker to be purged", lambda: len(cluster.workers()) == 1, timeout=5)
    purge_s = time.monotonic() - killed
    # Purged by its missed heartbeats (liveness 0.6 s), not by some later timeout; the
    # slack is a loaded machine's, where the kill and the CONTROL round trip lag too.
    assert purge_s < 3.0, purge_s
    (alive,) = cluster.workers()
    for _ in range(4):
        response = chat(url)
        assert response.status_code == 200, response.text
        assert response.headers["x-mlx-stack-worker"] == alive.worker_id
    assert survivor.alive()


def test_a_stream_answers_its_status_once_the_worker_started_not_at_the_first_token(
        cluster: Cluster) -> None:
    # A first token 60 s away: the client still has its 200, headers and first chunk at
    # once, as from a model's own server (the worker's "started" PARTIAL, before prefill).
    cluster.worker("--engine", "synthetic", "--model", "syn", "--ttft", "60")
    url = cluster.gateway()
    fast = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)
    with fast.chat.completions.create(model="syn", max_tokens=3, stream=True, messages=[
            {"role": "user", "content": "hi"}]) as stream:
        assert stream.response.status_code == 200
        assert stream.response.headers["x-mlx-stack-worker"]
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        assert not first.choices[0].delta.content


def test_job_waits_for_a_free_slot_then_completes(cluster: Cluster) -> None:
    cluster.worker("--engine", "synthetic", "--model", "syn", "--slots", "1", "--rate", "50")
    url = cluster.gateway()
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(chat, url, max_tokens=10) for _ in range(3)]
        results = [f.result(timeout=60) for f in futures]
    assert [r.status_code for r in results] == [200, 200, 200]
    waits = sorted(r.queue_wait_ms for r in cluster.control("routes", last=3))
    assert waits[-1] > 100, waits  # one job waited for two others of ~200 ms each


def test_full_queue_answers_429_with_retry_after(tmp_path) -> None:
    c = Cluster(tmp_path, env={"MLX_STACK_QUEUE_SIZE": "1"})
    try:
        c.broker()
        c.worker("--engine", "synthetic", "--model", "syn", "--slots", "1", "--rate", "20")
        url = c.gateway()
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(chat, url, max_tokens=20) for _ in range(4)]
            results = [f.result(timeout=60) for f in futures]
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 200, 429, 429], codes
        rejected = next(r for r in results if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["code"] == "queue_full"
        assert rejected.json()["error"]["type"] == "rate_limit_error"
    finally:
        c.close()


def test_known_model_without_worker_waits_the_grace_then_503(tmp_path) -> None:
    c = Cluster(tmp_path, env={"MLX_STACK_GRACE": "1.0"})
    try:
        c.broker()
        worker = c.worker("--engine", "synthetic", "--model", "syn")
        url = c.gateway()
        worker.kill()
        wait_for("the worker to be purged", lambda: not c.workers())
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            client(url).chat.completions.create(
                model="syn", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        assert time.monotonic() - started >= 1.0
        assert info.value.body["code"] == "no_worker"
    finally:
        c.close()


def test_known_model_whose_worker_returns_within_grace_is_served(cluster: Cluster) -> None:
    worker = cluster.worker("--engine", "synthetic", "--model", "syn")
    url = cluster.gateway()
    worker.kill()
    wait_for("the worker to be purged", lambda: not cluster.workers())
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(chat, url)
        cluster.worker("--engine", "synthetic", "--model", "syn")
        assert pending.result(timeout=30).status_code == 200


def test_a_model_this_node_expects_waits_for_its_loading_worker(tmp_path) -> None:
    """``mlx-stack up`` names the models its workers will serve: a request that arrives
    while they load waits for them; a model never named is still a 404 at once."""
    import concurrent.futures as cf

    c = Cluster(tmp_path, env={"MLX_STACK_EXPECT_MODELS": "syn,quick"})
    try:
        c.broker()
        url = c.gateway(healthy=False)  # no worker yet: /health is 503
        with pytest.raises(openai.NotFoundError):
            client(url).chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "hi"}])
        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(chat, url, "quick")
            wait_for("the request to wait at the broker",
                     lambda: c.control("status").queues.get("quick"))
            c.worker("--engine", "synthetic", "--model", "syn=quick")
            assert pending.result(timeout=30).status_code == 200
    finally:
        c.close()


def test_unknown_model_is_404_at_once_listing_models(cluster: Cluster) -> None:
    cluster.worker("--engine", "synthetic", "--model", "syn")
    url = cluster.gateway()
    with pytest.raises(openai.NotFoundError) as info:
        client(url).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "syn" in error["message"]


def test_garbage_frames_on_the_broker_port_are_dropped_and_counted(cluster: Cluster) -> None:
    cluster.worker("--engine", "synthetic", "--model", "syn")
    url = cluster.gateway()
    rng = random.Random(7)
    sock = cluster.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.endpoint)
    garbage = [
        [b""], [b"x"] * 7, [wire.WORKER, b"\x01", b"\xc1"], [wire.GATEWAY, b"\x09", b"\x80"],
        [wire.WORKER, bytes((msgs.Command.PARTIAL,)), b"\x81\xa6job_id\x01"],
        *([rng.randbytes(rng.randrange(1, 64)) for _ in range(3)] for _ in range(50)),
    ]
    for frames in garbage:
        sock.send_multipart(frames)
    raw = cluster.ctx.socket(zmq.STREAM)  # not even ZMTP: plain bytes on the port
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(cluster.endpoint)
    ident = raw.getsockopt(zmq.ROUTING_ID)
    raw.send_multipart([ident, b"GET / HTTP/1.0\r\n\r\n" + rng.randbytes(512)])
    wait_for("the broker to count the garbage", lambda: cluster.control("status")
             .counters.get("dropped", 0) >= len(garbage) - 1)
    rejected = cluster.control("status").rejected
    assert sum(rejected.values()) >= len(garbage) - 1, rejected
    assert {"frame_count", "undecodable", "missing_field"} <= rejected.keys(), rejected
    assert "handler_error" not in rejected
    assert chat(url).status_code == 200


def test_a_submit_the_broker_cannot_read_is_refused_at_once(
        cluster: Cluster, dealer: Callable[[], zmq.Socket]) -> None:
    """A request with a field this broker does not know (a newer gateway's) fails the
    SUBMIT's decoding: the gateway hears a FAIL for its job id, not nothing until its
    deadline. A SUBMIT without a readable job id is only dropped."""
    sock = dealer()
    body = {"job_id": "newer", "model": "syn",
            "request": {**GenerationRequest(kind="chat").to_dict(), "novel_field": 1}}
    sock.send_multipart([wire.GATEWAY, bytes((msgs.Command.SUBMIT,)), msgpack.packb(body)])
    sock.send_multipart([wire.GATEWAY, bytes((msgs.Command.SUBMIT,)),
                         msgpack.packb({**body, "job_id": 7})])
    assert sock.poll(5000), "no answer to a SUBMIT the broker could not read"
    _, msg = wire.decode(sock.recv_multipart(), wire.FROM_BROKER)
    assert isinstance(msg, msgs.Fail) and msg.job_id == "newer", msg
    assert msg.code == msgs.ErrorCode.INVALID_REQUEST and "novel_field" in msg.error
    assert not sock.poll(500), "a SUBMIT without a job id was answered"


def test_a_peer_may_not_switch_roles_and_strangers_must_register(
        cluster: Cluster, dealer: Callable[[], zmq.Socket]) -> None:
    """A gateway's connection cannot register a worker; a worker that never sent READY
    is told to (DISCONNECT) and nothing it sends is acted on. Both are counted."""
    sock = dealer()
    sock.send_multipart(wire.encode(wire.GATEWAY, msgs.Heartbeat()))
    sock.send_multipart(wire.encode(wire.WORKER, msgs.Ready(worker_id="w", node_id="n",
                                                            model_id="impostor")))
    stranger = dealer()
    stranger.send_multipart(wire.encode(wire.WORKER,
                                        msgs.Final(job_id="x/0", finish_reason="stop")))
    assert stranger.poll(5000), "no answer to an unregistered worker"
    assert isinstance(wire.decode(stranger.recv_multipart(), wire.FROM_BROKER)[1], msgs.Disconnect)
    status = wait_for("both rejects to be counted", lambda: (s := cluster.control("status"))
                      and {"wrong_role", "unregistered"} <= s.rejected.keys() and s)
    assert status.workers == []


def test_an_announce_with_an_unusable_endpoint_is_refused(
        cluster: Cluster, dealer: Callable[[], zmq.Socket]) -> None:
    dealer().send_multipart(wire.encode(wire.PEER, msgs.Announce(node_id="x", endpoint="not a url",
                                                    priority=99, coordinator=True, epoch=7)))
    status = wait_for("the ANNOUNCE to be refused", lambda: (s := cluster.control("status"))
                      and s.rejected.get("bad_announce") and s)
    assert status.role == "coordinator" and status.peers == [] and status.epoch < 7


def test_a_resubmission_skips_the_full_queue(tmp_path) -> None:
    """A request admitted once (attempt > 0: its worker died) is never refused with 429."""
    c = Cluster(tmp_path, env={"MLX_STACK_QUEUE_SIZE": "1"})
    try:
        c.broker()
        c.worker("--engine", "synthetic", "--model", "syn", "--slots", "1", "--rate", "50")
        sock = c.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(c.endpoint)
        request = GenerationRequest(kind="completion", prompt="x", max_tokens=10)

        def submit(job_id: str, attempt: int) -> None:
            sock.send_multipart(wire.encode(wire.GATEWAY, msgs.Submit(
                job_id=job_id, model="syn", request=request, attempt=attempt)))

        submit("running", 0)
        submit("queued", 0)
        submit("refused", 0)
        submit("resumed", 1)
        outcomes: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while len(outcomes) < 4 and time.monotonic() < deadline:
            if sock.poll(1000):
                _, msg = wire.decode(sock.recv_multipart(), wire.FROM_BROKER)
                if isinstance(msg, msgs.Final | msgs.Fail):
                    outcomes[msg.job_id.partition("/")[0]] = getattr(msg, "code", "ok")
        assert outcomes == {"running": "ok", "queued": "ok", "refused": "queue_full",
                            "resumed": "ok"}
        order = [r.job_id for r in c.control("routes", last=3)]
        assert order == ["running", "resumed", "queued"]  # resumes wait at the head
    finally:
        c.close()


def test_the_highest_epoch_a_peer_may_announce_still_leaves_room_to_take_over(
        cluster: Cluster, dealer: Callable[[], zmq.Socket]) -> None:
    """Wire integers stop at 2**63 - 1 and a peer's epoch must be below that, so the
    broker's epoch + 1 on taking over is still one every peer accepts."""
    sock = dealer()
    sock.send_multipart(wire.encode(wire.PEER, msgs.Announce(
        node_id="a", endpoint="tcp://127.0.0.1:9", priority=99, coordinator=True,
        epoch=INT_MAX - 1)))
    wait_for("the broker to follow the peer", lambda: cluster.control("status").role
             == "standby")
    for epoch in (INT_MAX, 2**64 - 1):  # refused: no room left / not on the wire
        sock.send_multipart(wire.encode(wire.PEER, msgs.Announce(
            node_id="b", endpoint="tcp://127.0.0.1:10", epoch=epoch)))
    status = wait_for("the broker to take over once the peer is silent",
                      lambda: (s := cluster.control("status")).role == "coordinator" and s)
    assert status.epoch == INT_MAX
    assert status.rejected.get("bad_value") == 1
    assert status.rejected.get("bad_announce") == 1


def test_control_refuses_unknown_operations_and_bad_arguments(cluster: Cluster) -> None:
    with pytest.raises(ControlError, match=r"unknown op 'bogus'; use status\|models"):
        cluster.try_control("bogus")
    asker = ControlClient(cluster.endpoint, Settings.load(home=cluster.tmp / "home"), None,
                          cluster.ctx)
    with pytest.raises(ControlError, match="bad arguments"):
        asker.ask("add_peer", endpoint="not an endpoint")
    assert cluster.control("routes", last=-1) == []  # a bad count falls back to the default
    assert cluster.control("status").role == "coordinator"


def test_a_restarted_lone_broker_takes_a_higher_epoch(cluster: Cluster) -> None:
    """Epochs survive a restart (kept in the node's home), so a lone broker that comes
    back is not fenced off as older by those that saw its earlier term."""
    first = cluster.control("status").epoch
    cluster.procs[0].kill(signal.SIGKILL)
    cluster.broker()
    assert cluster.control("status").epoch > first >= 1
