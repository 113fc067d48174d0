"""A job's way out of the worker, with real sockets: straight to the gateway's stream
socket when it is connected, through the broker when not (the first job for a gateway
opens the connection), and cancelled when a direct connection drops (what was in flight
is lost)."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import pytest
import zmq

from common import protocol as p
from common.config import Settings
from common.generation import GenerationRequest
from common.meshkeys import MeshKeys, new_secret
from common.transport import configure, waiting
from gateway.streams import StreamSocket
from testkit.harness import free_port, wait_for
from worker import streams as streams_module
from worker.streams import Streams

SETTINGS = Settings(heartbeat_interval=0.2)


def job(job_id: str, reply_to: str) -> p.Job:
    return p.Job(job_id=job_id, request=GenerationRequest(kind="chat"), reply_to=reply_to)


def started(job_id: str) -> p.Partial:
    return p.Partial(job_id=job_id, token_ids=[], text="")


def output(job_id: str, seq: int) -> p.Partial:
    return p.Partial(job_id=job_id, token_ids=[seq], text=f"t{seq}", seq=seq)


class Setup:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.counters: collections.Counter[str] = collections.Counter()
        self.streams = Streams(SETTINGS, None, self.ctx, self.count)
        self.to_broker: list[p.Message] = []

    def count(self, key: str) -> None:
        self.counters[key] += 1

    def send(self, msg: p.Partial | p.Final | p.Fail) -> list[str]:
        return self.streams.send(msg, self.to_broker.append)

    def connect(self, gateway: StreamSocket) -> None:
        """Start jobs until one's first message goes direct: the connection is up."""
        for n in range(100):
            self.streams.expect(job(f"warm/{n}", gateway.endpoint))
            self.send(started(f"warm/{n}"))
            self.send(p.Final(job_id=f"warm/{n}", finish_reason="stop"))
            if gateway.sock.poll(50):
                gateway.receive()
                self.to_broker.clear()
                return
        raise AssertionError("the worker never connected to the gateway's stream socket")

    def close(self) -> None:
        self.streams.close()
        self.ctx.destroy(linger=0)


def test_with_nobody_listening_the_broker_relays_everything() -> None:
    s = Setup()
    try:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        for n in range(2):  # the first opens the connection, the second finds it down
            s.streams.expect(job(f"a/{n}", endpoint))
            messages = [started(f"a/{n}"), output(f"a/{n}", 1),
                        p.Final(job_id=f"a/{n}", finish_reason="stop", parts=2)]
            assert [s.send(m) for m in messages] == [[], [], []]
            assert s.to_broker == messages and s.streams.streamed() == []
            s.to_broker.clear()
        assert s.counters["jobs_relayed"] == 2
    finally:
        s.close()


@pytest.fixture
def connected() -> Iterator[tuple[Setup, StreamSocket]]:
    """A worker's streams connected to a gateway's stream socket, job a/0 started."""
    s = Setup()
    gateway = StreamSocket(SETTINGS, None, s.ctx)
    try:
        s.connect(gateway)
        s.streams.expect(job("a/0", gateway.endpoint))
        yield s, gateway
    finally:
        gateway.close()
        s.close()


def test_a_connected_job_streams_direct_and_the_heartbeat_tells_of_its_output(
        connected: tuple[Setup, StreamSocket]) -> None:
    s, gateway = connected
    final = p.Final(job_id="a/0", finish_reason="stop")  # parts: set on its way
    for msg in (started("a/0"), output("a/0", 1), output("a/0", 2), final):
        assert s.send(msg) == []
    got: list[p.Message] = []
    while len(got) < 4 and gateway.sock.poll(5000):
        got += gateway.receive()
    assert [(type(m).__name__, getattr(m, "seq", None)) for m in got] == [
        ("Partial", 0), ("Partial", 1), ("Partial", 2), ("Final", None)]
    assert got[-1].parts == 3  # what the gateway must have before it ends the stream
    # The broker: the FINAL (a free slot, and the gateway's guard against lost
    # PARTIALs), and in the next heartbeat that output began (the job can no longer
    # run again unseen), once.
    assert s.to_broker == [final] and final.parts == 3
    assert s.streams.streamed() == ["a/0"] and s.streams.streamed() == []


def test_a_dropped_direct_connection_cancels_its_jobs(
        connected: tuple[Setup, StreamSocket]) -> None:
    s, gateway = connected
    s.streams.expect(job("b/0", gateway.endpoint))
    assert s.send(started("a/0")) == [] and s.send(started("b/0")) == []
    gateway.close()  # the gateway's process died: frames in flight are gone
    cancel: list[str] = []
    for n in range(1, 200):  # its monitor tells before a send: a moment after the close
        cancel = s.send(output("a/0", n))
        if cancel:
            break
        s.streams.sockets[gateway.endpoint][1].poll(20)
    assert sorted(cancel) == ["a/0", "b/0"]
    # Until the cancellations end them, their output is dropped, not sent out of order
    # through the broker; the cancellations' FAILs go to the broker.
    assert s.send(output("b/0", 1)) == [] and s.to_broker == []
    s.send(p.Fail(job_id="a/0", error="cancelled", code=p.ErrorCode.CANCELLED,
                  retryable=True))
    assert [type(m) for m in s.to_broker] == [p.Fail]
    assert s.counters["streams_lost"] == 2
    # b ends before its cancellation: its FINAL would end the stream short of what was
    # lost, so the broker gets a retryable FAIL and the gateway resumes it.
    s.send(p.Final(job_id="b/0", finish_reason="stop"))
    (fail,) = s.to_broker[1:]
    assert isinstance(fail, p.Fail) and fail.retryable and fail.job_id == "b/0"


def test_with_a_mesh_secret_only_members_reach_the_stream_socket() -> None:
    keys = MeshKeys.from_secret(new_secret())
    ctx = zmq.Context()
    gateway = StreamSocket(SETTINGS, keys, ctx)
    frames = p.encode(p.WORKER, output("a/0", 0))

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


def test_connections_no_job_uses_any_more_are_closed(monkeypatch) -> None:
    # A gateway that restarted listens on another port: the old connection would retry
    # for ever. Busy connections stay.
    monkeypatch.setattr(streams_module, "IDLE_S", 0.0)
    s = Setup()
    try:
        old, busy, new = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
        for name, endpoint in (("a/0", old), ("b/0", busy), ("c/0", new)):
            s.streams.expect(job(name, endpoint))
            s.send(started(name))
            if name == "a/0":
                s.send(p.Final(job_id="a/0", finish_reason="stop"))
        assert list(s.streams.sockets) == [busy, new]
    finally:
        s.close()


def test_a_connection_that_dropped_and_came_back_still_cancels_its_jobs() -> None:
    # The gateway restarted on the same port: sends succeed again, but what was in
    # flight when the connection dropped is gone, and the new gateway never knew the job.
    port = free_port()
    settings = Settings(heartbeat_interval=0.2, stream_port=port)
    s = Setup()
    gateway = StreamSocket(settings, None, s.ctx)
    try:
        s.connect(gateway)
        s.streams.expect(job("a/0", gateway.endpoint))
        assert s.send(started("a/0")) == []
        gateway.close()

        def rebound() -> StreamSocket | None:  # ZeroMQ frees the port a moment later
            try:
                return StreamSocket(settings, None, s.ctx)
            except ValueError:
                return None

        gateway = wait_for("the gateway's port to be free", rebound, timeout=10)
        sock, monitor = s.streams.sockets[gateway.endpoint]
        # The drop reached the monitor (it is only looked at, not read); until then the
        # old connection may still look writable to a loaded machine's poll.
        wait_for("the drop to be reported", lambda: waiting(monitor), timeout=10)
        assert sock.poll(5000, zmq.POLLOUT)  # connected again (ZMQ_IMMEDIATE)
        # A new job's first message is the first to look: it starts on the new
        # connection, the job that streamed across the drop is cancelled.
        s.streams.expect(job("c/0", gateway.endpoint))
        assert s.send(started("c/0")) == ["a/0"]
        assert s.streams.ways["c/0"] == gateway.endpoint
    finally:
        gateway.close()
        s.close()
