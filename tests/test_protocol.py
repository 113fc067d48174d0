"""The wire protocol: round trips, and every kind of garbage rejected, never crashing."""

from __future__ import annotations

import msgpack
import pytest

from common import protocol as p


def frames(tag: bytes, command: int, body: object) -> list[bytes]:
    return [tag, bytes((command,)), msgpack.packb(body)]


def test_round_trip_every_message() -> None:
    samples = [
        p.Ready(worker_id="w", node_id="n", model_id="m", aliases=["fast"], slots=2),
        p.Heartbeat(active=1, mem_free=5, tokens_per_s=1.5, counters={"x": 1}),
        p.Partial(job_id="j", seq=0, token_ids=[1, 2], text="hi"),
        p.Final(job_id="j", finish_reason="stop", usage={"prompt_tokens": 3}),
        p.Fail(job_id="j", error="boom", retryable=True),
        p.Disconnect(),
    ]
    for msg in samples:
        tag, decoded = p.decode(p.encode(p.WORKER, msg), p.TO_BROKER)
        assert (tag, decoded) == (p.WORKER, msg)
    submit = p.Submit(job_id="j", model="m", request={"kind": "chat"}, epoch=3,
                      resume_token_ids=[9], resume_text="x", deadline=1.5)
    assert p.decode(p.encode(p.GATEWAY, submit), p.TO_BROKER) == (p.GATEWAY, submit)


@pytest.mark.parametrize("bad, reason", [
    ([p.WORKER, b"\x01"], "expected 3 frames"),
    ([b"HTTP/1.1", b"\x01", b"\x80"], "unknown protocol"),
    ([p.WORKER, b"\xff", b"\x80"], "unknown command"),
    ([p.WORKER, b"\x01\x01", b"\x80"], "unknown command"),
    ([p.WORKER, bytes((p.Command.SUBMIT,)), b"\x80"], "not allowed"),
    ([p.WORKER, bytes((p.Command.HEARTBEAT,)), b"\xc1"], "undecodable"),
    ([p.WORKER, bytes((p.Command.HEARTBEAT,)), b"\x92\x01\x02"], "not a map"),
    ([p.WORKER, bytes((p.Command.HEARTBEAT,)), b"\x00" * (p.MAX_BODY_BYTES + 1)], "exceeds"),
    (frames(p.WORKER, p.Command.HEARTBEAT, {"active": "1"}), "bad type"),
    (frames(p.WORKER, p.Command.HEARTBEAT, {"active": True}), "bad type"),
    (frames(p.WORKER, p.Command.HEARTBEAT, {"bogus": 1}), "unknown field"),
    (frames(p.WORKER, p.Command.PARTIAL, {"job_id": "j", "seq": 0, "token_ids": ["a"],
                                          "text": ""}), "bad type"),
    (frames(p.WORKER, p.Command.PARTIAL, {"job_id": "j"}), "missing"),
    (frames(p.GATEWAY, p.Command.SUBMIT, {"job_id": "j", "model": "m", "request": {1: 2}}),
     "undecodable"),
])
def test_garbage_is_rejected(bad: list[bytes], reason: str) -> None:
    with pytest.raises(p.ProtocolError, match=reason):
        p.decode(bad, p.TO_BROKER)


def test_generation_request_is_validated() -> None:
    ok = p.GenerationRequest(kind="chat", messages=[{"role": "user", "content": "hi"}])
    assert p.from_dict(p.GenerationRequest, ok.to_dict()) == ok
    with pytest.raises(p.ProtocolError, match="max_tokens"):
        p.from_dict(p.GenerationRequest, {"kind": "chat", "max_tokens": "many"})
    with pytest.raises(p.ProtocolError, match="seed"):
        p.from_dict(p.GenerationRequest, {"kind": "chat", "seed": 1.5})
