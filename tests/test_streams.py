"""A job's way out of the worker, with real sockets: straight to the gateway's stream
socket when it is connected, through the broker when not, and cancelled when a direct
connection drops (what was in flight is lost)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from common import protocol as p
from common.config import Settings
from common.meshkeys import MeshKeys, new_secret
from common.transport import configure
from gateway.streams import StreamSocket
from tests.harness import free_port
from worker import streams as streams_module
from worker.streams import Streams

SETTINGS = Settings(heartbeat_interval=0.2)


def job(job_id: str, reply_to: str) -> p.Job:
    return p.Job(job_id=job_id, request={}, reply_to=reply_to)


def started(job_id: str) -> p.Partial:
    return p.Partial(job_id=job_id, token_ids=[], text="")


def output(job_id: str, seq: int) -> p.Partial:
    return p.Partial(job_id=job_id, token_ids=[seq], text=f"t{seq}", seq=seq)


class Setup:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.streams = Streams(SETTINGS, None, self.ctx, self.poller)
        self.to_broker: list[p.Message] = []

    def send(self, msg: p.Partial | p.Final | p.Fail) -> bool:
        return self.streams.send(msg, self.to_broker.append)

    def connect(self, gateway: StreamSocket) -> None:
        """Start jobs until one's first message goes direct: the connection is up."""
        for n in range(100):
            self.streams.start(job(f"warm/{n}", gateway.endpoint))
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
        s.streams.start(job("a/0", f"tcp://127.0.0.1:{free_port()}"))
        messages = [started("a/0"), output("a/0", 1), p.Final(job_id="a/0",
                                                              finish_reason="stop", parts=2)]
        assert all(s.send(m) for m in messages)
        assert s.to_broker == messages and s.streams.streamed() == []
        assert s.streams.counters["jobs_relayed"] == 1
    finally:
        s.close()


@pytest.fixture
def connected() -> Iterator[tuple[Setup, StreamSocket]]:
    """A worker's streams connected to a gateway's stream socket, job a/0 started."""
    s = Setup()
    gateway = StreamSocket(SETTINGS, None, s.ctx)
    try:
        s.connect(gateway)
        s.streams.start(job("a/0", gateway.endpoint))
        yield s, gateway
    finally:
        gateway.close()
        s.close()


def test_a_connected_job_streams_direct_and_the_heartbeat_tells_of_its_output(
        connected: tuple[Setup, StreamSocket]) -> None:
    s, gateway = connected
    final = p.Final(job_id="a/0", finish_reason="stop", parts=3)
    for msg in (started("a/0"), output("a/0", 1), output("a/0", 2), final):
        assert s.send(msg)
    got: list[p.Message] = []
    while len(got) < 4 and gateway.sock.poll(5000):
        got += gateway.receive()
    assert [(type(m).__name__, getattr(m, "seq", None)) for m in got] == [
        ("Partial", 0), ("Partial", 1), ("Partial", 2), ("Final", None)]
    # The broker: the FINAL (a free slot, and the gateway's guard against lost
    # PARTIALs), and in the next heartbeat that output began (the job can no longer
    # run again unseen), once.
    assert s.to_broker == [final]
    assert s.streams.streamed() == ["a/0"] and s.streams.streamed() == []


def test_a_dropped_direct_connection_cancels_its_jobs(
        connected: tuple[Setup, StreamSocket]) -> None:
    s, gateway = connected
    assert s.send(started("a/0"))
    gateway.close()  # the gateway's process died: frames in flight are gone
    lost: list[str] = []
    for _ in range(50):
        lost = s.streams.lost(dict(s.poller.poll(100)))
        if lost:
            break
    assert lost == ["a/0"]
    # Until the cancellation ends it, its output is dropped, not sent out of order
    # through the broker; the cancellation's FAIL goes to the broker.
    assert s.send(output("a/0", 1)) and s.to_broker == []
    s.send(p.Fail(job_id="a/0", error="cancelled", code=p.ErrorCode.CANCELLED,
                  retryable=True))
    assert [type(m) for m in s.to_broker] == [p.Fail]
    assert s.streams.counters["streams_lost"] == 1


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
        s.streams.start(job("a/0", old))
        s.send(p.Fail(job_id="a/0", error="refused", code=p.ErrorCode.INVALID_REQUEST))
        s.streams.start(job("b/0", busy))
        s.streams.start(job("c/0", new))
        assert list(s.streams.sockets) == [busy, new]
    finally:
        s.close()
