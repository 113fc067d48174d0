"""A job's way out of the worker, with real sockets: one way per job, chosen when it
starts, that every frame of the job takes. Straight to the gateway's stream socket when
the connection is up or comes up in time (the first job to a gateway waits for it),
through the broker otherwise; the seat is freed by a RELEASE to the broker; a direct
connection that drops cancels its jobs (what was in flight is lost)."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator

import pytest
import zmq

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.config import Settings
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.meshkeys import MeshKeys, new_secret
from mlx_stack.common.transport import configure, waiting
from mlx_stack.gateway.streams import StreamSocket
from mlx_stack.worker import ways as ways_module
from mlx_stack.worker.outbox import Outbox
from mlx_stack.worker.ways import Ways
from testkit.harness import free_port, wait_for

SETTINGS = Settings(heartbeat_interval=0.2)
WHERE = msgs.Accepted(job_id="", node_id="n", worker_id="w", model_id="m")


def job(job_id: str, reply_to: str) -> msgs.Job:
    return msgs.Job(job_id=job_id, request=GenerationRequest(kind="chat"), reply_to=reply_to)


def output(job_id: str, n: int) -> msgs.Partial:
    return msgs.Partial(job_id=job_id, token_ids=[n], text=f"t{n}")


def final(job_id: str) -> msgs.Final:
    return msgs.Final(job_id=job_id, finish_reason="stop")


class Setup:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.counters: collections.Counter[str] = collections.Counter()
        self.outbox = Outbox()
        self.cancelled: list[str] = []
        self.ways = Ways(SETTINGS, None, self.ctx, self.outbox, WHERE,
                         self.cancelled.append, self.count)

    def count(self, key: str) -> None:
        self.counters[key] += 1

    def run(self, job_id: str, reply_to: str, tokens: int = 2) -> None:
        """A whole job: started, ``tokens`` PARTIALs, its FINAL."""
        self.ways.open(job(job_id, reply_to))
        for n in range(tokens):
            self.ways.send(output(job_id, n))
        self.ways.send(final(job_id))

    def to_broker(self) -> list[tuple[str, str]]:
        return shown(self.outbox.take())

    def close(self) -> None:
        self.ways.close()
        self.outbox.close()
        self.ctx.destroy(linger=0)


def shown(messages: list[msgs.Message]) -> list[tuple[str, str]]:
    return [(type(m).__name__, m.job_id) for m in messages]


def received(gateway: StreamSocket, count: int) -> list[msgs.Message]:
    got: list[msgs.Message] = []
    while len(got) < count and gateway.sock.poll(5000):
        got += gateway.receive()
    assert not gateway.sock.poll(100), "more frames than expected came direct"
    return got


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = Setup()
    try:
        yield s
    finally:
        s.close()


def test_the_first_job_to_a_gateway_waits_for_the_connection_and_goes_direct_whole(
        setup: Setup) -> None:
    gateway = StreamSocket(SETTINGS, None, setup.ctx)
    try:
        setup.run("a/0", gateway.endpoint)
        got = received(gateway, 4)
        assert [(type(m).__name__, getattr(m, "seq", None)) for m in got] == [
            ("Accepted", None), ("Partial", 0), ("Partial", 1), ("Final", None)]
        assert got[0].worker_id == "w" and got[-1].parts == 2  # numbered once, here
        # The broker: no frame of the job, only the seat to free; and, for the next
        # heartbeat, that its output began (it can no longer run again unseen).
        assert setup.to_broker() == [("Release", "a/0")]
        assert setup.outbox.take_streamed() == ["a/0"]
        assert setup.counters == {"jobs_direct": 1}
    finally:
        gateway.close()


def test_a_job_to_a_gateway_nobody_reaches_is_relayed_whole(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ways_module, "CONNECT_WAIT_S", 0.1)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    setup.run("a/0", endpoint)
    # Its two PARTIALs waited together for the I/O thread: one frame, numbered once.
    frames = [("Accepted", "a/0"), ("Partial", "a/0"), ("Final", "a/0")]
    sent = setup.outbox.take()
    assert shown(sent) == [*frames, ("Release", "a/0")]
    assert (sent[1].seq, sent[1].text, sent[2].parts) == (0, "t0t1", 1)
    # Taken for unreachable: the next job does not wait again.
    began = time.monotonic()
    setup.run("b/0", endpoint)
    assert time.monotonic() - began < 0.1
    assert [kind for kind, _ in setup.to_broker()] == [k for k, _ in frames] + ["Release"]
    setup.run("c/0", "")  # no endpoint: the broker judged the gateway out of reach
    assert len(setup.to_broker()) == 4 and setup.outbox.take_streamed() == []
    assert setup.counters == {"jobs_relayed": 3}


@pytest.fixture
def connected(setup: Setup) -> Iterator[tuple[Setup, StreamSocket]]:
    """Ways connected to a gateway's stream socket (one job done), job a/0 started."""
    gateway = StreamSocket(SETTINGS, None, setup.ctx)
    try:
        setup.run("warm/0", gateway.endpoint)
        received(gateway, 4)
        setup.outbox.take()
        setup.ways.open(job("a/0", gateway.endpoint))
        yield setup, gateway
    finally:
        gateway.close()


def test_a_dropped_direct_connection_cancels_its_jobs(
        connected: tuple[Setup, StreamSocket]) -> None:
    s, gateway = connected
    s.ways.open(job("b/0", gateway.endpoint))
    gateway.close()  # the gateway's process died: frames in flight are gone
    for n in range(200):  # its monitor tells before a send: a moment after the close
        s.ways.send(output("a/0", n))
        if s.cancelled:
            break
        s.ways.sockets[gateway.endpoint][1].poll(20)
    assert sorted(s.cancelled) == ["a/0", "b/0"]
    # warm/0, released a moment before, may have lost its last frames with the
    # connection: a FAIL has the broker tell its gateway (ignored if its FINAL came).
    assert s.to_broker() == [("Fail", "warm/0")]
    # Until the cancellations end them, their output is dropped, not sent out of order
    # through the broker; the cancellations' FAILs go to the broker.
    s.ways.send(output("b/0", 1))
    assert s.to_broker() == []
    s.ways.send(msgs.Fail(job_id="a/0", error="cancelled", code=msgs.ErrorCode.CANCELLED,
                          retryable=True))
    assert s.to_broker() == [("Fail", "a/0")]
    assert s.counters["streams_lost"] == 2
    # b ends before its cancellation: its FINAL would end the stream short of what was
    # lost, so the broker gets a retryable FAIL and the gateway resumes it.
    s.ways.send(final("b/0"))
    (fail,) = s.outbox.take()
    assert isinstance(fail, msgs.Fail) and fail.retryable and fail.job_id == "b/0"


def test_a_connection_that_drops_after_its_jobs_ended_is_found_at_the_heartbeat(
        setup: Setup) -> None:
    # Every job on it ended (their output may still have been queued behind a slow link)
    # and no send will come: the heartbeat's look finds the drop and FAILs them all, so
    # the broker has their gateway resume those whose FINAL did not arrive.
    gateway = StreamSocket(SETTINGS, None, setup.ctx)
    try:
        setup.run("a/0", gateway.endpoint)
        setup.run("b/0", gateway.endpoint)
        received(gateway, 8)
        assert setup.to_broker() == [("Release", "a/0"), ("Release", "b/0")]
        setup.ways.watch()  # nothing dropped yet
        assert setup.to_broker() == []
        gateway.close()
        monitor = setup.ways.sockets[gateway.endpoint][1]
        assert monitor.poll(5000)  # the drop is known to the worker's side
        setup.ways.watch()
        assert setup.to_broker() == [("Fail", "a/0"), ("Fail", "b/0")]
        setup.ways.watch()  # told once
        assert setup.to_broker() == []
    finally:
        gateway.close()


def test_an_ended_job_is_watched_for_released_watch_s(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    # After RELEASED_WATCH_S the broker has forgotten the job: nothing to tell.
    gateway = StreamSocket(SETTINGS, None, setup.ctx)
    try:
        setup.run("a/0", gateway.endpoint)
        received(gateway, 4)
        setup.to_broker()
        later = time.monotonic() + msgs.RELEASED_WATCH_S + 1
        monkeypatch.setattr(ways_module.time, "monotonic", lambda: later)
        setup.ways.watch()
        assert setup.ways.ended == {} and setup.ways.last_ended == {}
        gateway.close()
        assert setup.ways.sockets[gateway.endpoint][1].poll(5000)
        setup.ways.watch()  # no job there any more: not looked at, nothing sent
        assert setup.to_broker() == []
    finally:
        gateway.close()


def test_with_a_mesh_secret_only_members_reach_the_stream_socket() -> None:
    keys = MeshKeys.from_secret(new_secret())
    ctx = zmq.Context()
    gateway = StreamSocket(SETTINGS, keys, ctx)
    frames = wire.encode(wire.WORKER, output("a/0", 0))

    def client(member: bool, own_pair: bool) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if member:
            configure(sock, SETTINGS, keys)
        elif own_pair:  # knows the public key (leaked), not the secret
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = keys.public
        sock.connect(gateway.endpoint)
        sock.send_multipart(frames)
        return sock

    try:
        strangers = [client(False, own_pair=False), client(False, own_pair=True)]
        member = client(True, own_pair=False)
        assert gateway.sock.poll(5000)
        got = gateway.receive()
        assert not gateway.sock.poll(300)  # the strangers' frames never come
        assert [m.text for m in got] == ["t0"]
        for sock in [*strangers, member]:
            sock.close(0)
    finally:
        gateway.close()
        ctx.destroy(linger=0)


def test_connections_no_job_uses_any_more_are_closed(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    # A gateway that restarted listens on another port: the old connection would retry
    # for ever. Busy connections stay, and those a job ended on within RELEASED_WATCH_S
    # (its output may still be queued there).
    monkeypatch.setattr(ways_module, "IDLE_S", 0.0)
    old, busy, ended, new = (StreamSocket(SETTINGS, None, setup.ctx) for _ in range(4))
    try:
        setup.ways.open(job("a/0", old.endpoint))
        with pytest.MonkeyPatch.context() as m:
            m.setattr(msgs, "RELEASED_WATCH_S", 0.0)  # a/0's output is past watching
            setup.ways.send(final("a/0"))
        setup.ways.open(job("b/0", busy.endpoint))
        setup.ways.open(job("d/0", ended.endpoint))
        setup.ways.send(final("d/0"))
        setup.ways.open(job("c/0", new.endpoint))
        assert list(setup.ways.sockets) == [busy.endpoint, ended.endpoint, new.endpoint]
    finally:
        for gateway in (old, busy, new, ended):
            gateway.close()


def test_a_connection_that_dropped_and_came_back_still_cancels_its_jobs(
        setup: Setup) -> None:
    # The gateway restarted on the same port: sends succeed again, but what was in
    # flight when the connection dropped is gone, and the new gateway never knew the job.
    port = free_port()
    settings = Settings(heartbeat_interval=0.2, stream_port=port)
    gateway = StreamSocket(settings, None, setup.ctx)
    try:
        setup.ways.open(job("a/0", gateway.endpoint))
        assert received(gateway, 1)[0].job_id == "a/0"
        gateway.close()

        def rebound() -> StreamSocket | None:  # ZeroMQ frees the port a moment later
            try:
                return StreamSocket(settings, None, setup.ctx)
            except ValueError:
                return None

        gateway = wait_for("the gateway's port to be free", rebound, timeout=10)
        sock, monitor = setup.ways.sockets[gateway.endpoint]
        # The drop reached the monitor (it is only looked at, not read); until then the
        # old connection may still look writable to a loaded machine's poll.
        wait_for("the drop to be reported", lambda: waiting(monitor), timeout=10)
        assert sock.poll(5000, zmq.POLLOUT)  # connected again (ZMQ_IMMEDIATE)
        # A new job is the first to look: it starts on the new connection, the job that
        # streamed across the drop is cancelled.
        setup.ways.open(job("c/0", gateway.endpoint))
        assert setup.cancelled == ["a/0"]
        assert setup.ways.jobs["c/0"].endpoint == gateway.endpoint
    finally:
        gateway.close()
