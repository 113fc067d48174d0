"""The wire protocol: round trips, and every kind of garbage rejected, never crashing."""

from __future__ import annotations

import msgpack
import pytest

from common import protocol as p
from common.generation import GenerationRequest


def frames(tag: bytes, command: int, body: object) -> list[bytes]:
    return [tag, bytes((command,)), msgpack.packb(body)]


def test_round_trip_every_message() -> None:
    samples = [
        p.Ready(worker_id="w", node_id="n", model_id="m", tiers=["fast"], slots=2),
        p.Heartbeat(running=1, mem_free=5, tokens_per_s=1.5, counters={"x": 1}),
        p.Partial(job_id="j", seq=0, token_ids=[1, 2], text="hi"),
        p.Final(job_id="j", finish_reason="stop", usage={"prompt_tokens": 3}),
        p.Fail(job_id="j", error="boom", retryable=True),
        p.Disconnect(),
    ]
    for msg in samples:
        tag, decoded = p.decode(p.encode(p.WORKER, msg), p.TO_BROKER)
        assert (tag, decoded) == (p.WORKER, msg)
    submit = p.Submit(job_id="j", model="m", request=GenerationRequest(kind="chat"), epoch=3,
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
    (frames(p.WORKER, p.Command.HEARTBEAT, {"running": "1"}), "bad type"),
    (frames(p.WORKER, p.Command.HEARTBEAT, {"running": True}), "bad type"),
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


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def submit(request: object) -> list[bytes]:
    return frames(p.GATEWAY, p.Command.SUBMIT, {"job_id": "j", "model": "m",
                                                 "request": request})


@pytest.mark.parametrize("bad, reason", [
    ([p.WORKER], "frame_count"),
    ([b"?", b"\x01", b"\x80"], "unknown_protocol"),
    ([p.WORKER, b"\x00", b"\x80"], "unknown_command"),
    ([p.PEER, bytes((p.Command.SUBMIT,)), b"\x80"], "command_not_allowed"),
    ([p.WORKER, bytes((p.Command.HEARTBEAT,)), b"\x00" * (p.MAX_BODY_BYTES + 1)], "oversize"),
    ([p.WORKER, bytes((p.Command.HEARTBEAT,)), b"\x91" * 2000 + b"\xc0"], "undecodable"),
    ([p.WORKER, bytes((p.Command.HEARTBEAT,)), b"\xd4\x05\x01"], "undecodable"),  # ext
    ([p.WORKER, bytes((p.Command.HEARTBEAT,)), b"\x81\xa7running"], "undecodable"),
    ([p.WORKER, bytes((p.Command.HEARTBEAT,)), b"\x01"], "not_a_map"),
    (submit({"kind": "chat", "messages": nested(p.MAX_DEPTH)}), "too_deep"),
    (submit({"kind": msgpack.Timestamp(1)}), "bad_type"),
    (submit({"kind": b"chat"}), "bad_type"),
    (frames(p.GATEWAY, p.Command.SUBMIT, {"job_id": "j", "model": "m",
                                          "request": {b"kind": "chat"}}), "bad_key"),
    (submit({"kind": "chat", "seed": 2**64 - 1}), "bad_value"),
    (frames(p.WORKER, p.Command.HEARTBEAT, {"tokens_per_s": float("nan")}), "bad_value"),
    (frames(p.PEER, p.Command.ANNOUNCE, {"node_id": "n", "endpoint": "e",
                                        "started": float("inf")}), "bad_value"),
    (frames(p.WORKER, p.Command.HEARTBEAT, {"running": 1.5}), "bad_type"),
    (frames(p.WORKER, p.Command.HEARTBEAT, {"bogus": 1}), "unknown_field"),
    (frames(p.WORKER, p.Command.PARTIAL, {"job_id": "j"}), "missing_field"),
])
def test_each_rejection_names_its_reason(bad: list[bytes], reason: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode(bad, p.TO_BROKER)
    assert info.value.reason == reason, info.value


def test_plain_data_at_the_limits_is_accepted() -> None:
    request = {"kind": "chat", "seed": 2**63 - 1, "temperature": 0.0,
               "tools": [{"schema": nested(p.MAX_DEPTH - 4)}], "stop": []}
    _, msg = p.decode(submit(request), p.TO_BROKER)
    assert isinstance(msg, p.Submit) and msg.request == GenerationRequest(**request)


def test_generation_request_is_validated() -> None:
    ok = GenerationRequest(kind="chat", messages=[{"role": "user", "content": "hi"}])
    assert p.from_dict(GenerationRequest, ok.to_dict()) == ok
    with pytest.raises(p.ProtocolError, match="max_tokens"):
        p.from_dict(GenerationRequest, {"kind": "chat", "max_tokens": "many"})
    with pytest.raises(p.ProtocolError, match="seed"):
        p.from_dict(GenerationRequest, {"kind": "chat", "seed": 1.5})


def test_a_lone_surrogate_is_not_plain_data() -> None:
    """JSON may escape one ("\\ud800"); msgpack cannot encode it, so senders check first."""
    p.check_plain({"text": "caf\u00e9 \U0001f600"})
    with pytest.raises(p.ProtocolError) as info:
        p.check_plain({"messages": [{"content": "a\ud800"}]})
    assert info.value.reason == "bad_value"
