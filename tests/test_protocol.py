"""The wire protocol: round trips, and every kind of garbage rejected, never crashing."""

from __future__ import annotations

import msgpack
import pytest

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.plain import MAX_DEPTH, ProtocolError, check_plain, from_dict


def frames(tag: bytes, command: int, body: object) -> list[bytes]:
    return [tag, bytes((command,)), msgpack.packb(body)]


OVERSIZE = b"\x00" * (wire.MAX_BODY_BYTES + 1)


def test_round_trip_every_message() -> None:
    samples = [
        msgs.Ready(worker_id="w", node_id="n", model_id="m", tiers=["fast"], slots=2),
        msgs.Heartbeat(load=msgs.WorkerLoad(running=1, mem_free=5, tokens_per_s=1.5,
                                            counters={"x": 1})),
        msgs.Partial(job_id="j", seq=0, token_ids=[1, 2], text="hi"),
        msgs.Final(job_id="j", finish_reason="stop", usage={"prompt_tokens": 3}),
        msgs.Fail(job_id="j", error="boom", retryable=True),
        msgs.Disconnect(),
    ]
    for msg in samples:
        tag, decoded = wire.decode(wire.encode(wire.WORKER, msg), wire.TO_BROKER)
        assert (tag, decoded) == (wire.WORKER, msg)
    submit = msgs.Submit(job_id="j", model="m", request=GenerationRequest(kind="chat"), epoch=3,
                         resume_token_ids=[9], resume_text="x", deadline=1.5)
    assert wire.decode(wire.encode(wire.GATEWAY, submit), wire.TO_BROKER) == (wire.GATEWAY, submit)


@pytest.mark.parametrize("bad, reason", [
    ([wire.WORKER, b"\x01"], "expected 3 frames"),
    ([b"HTTP/1.1", b"\x01", b"\x80"], "unknown protocol"),
    ([wire.WORKER, b"\xff", b"\x80"], "unknown command"),
    ([wire.WORKER, b"\x01\x01", b"\x80"], "unknown command"),
    ([wire.WORKER, bytes((msgs.Command.SUBMIT,)), b"\x80"], "not allowed"),
    ([wire.WORKER, bytes((msgs.Command.HEARTBEAT,)), b"\xc1"], "undecodable"),
    ([wire.WORKER, bytes((msgs.Command.HEARTBEAT,)), b"\x92\x01\x02"], "not a map"),
    ([wire.WORKER, bytes((msgs.Command.HEARTBEAT,)), OVERSIZE], "exceeds"),
    (frames(wire.WORKER, msgs.Command.HEARTBEAT, {"load": {"running": "1"}}), "bad type"),
    (frames(wire.WORKER, msgs.Command.HEARTBEAT, {"load": {"running": True}}), "bad type"),
    (frames(wire.WORKER, msgs.Command.HEARTBEAT, {"bogus": 1}), "unknown field"),
    (frames(wire.WORKER, msgs.Command.PARTIAL, {"job_id": "j", "seq": 0, "token_ids": ["a"],
                                                "text": ""}), "bad type"),
    (frames(wire.WORKER, msgs.Command.PARTIAL, {"job_id": "j"}), "missing"),
    (frames(wire.GATEWAY, msgs.Command.SUBMIT, {"job_id": "j", "model": "m", "request": {1: 2}}),
     "undecodable"),
])
def test_garbage_is_rejected(bad: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        wire.decode(bad, wire.TO_BROKER)


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def submit(request: object) -> list[bytes]:
    return frames(wire.GATEWAY, msgs.Command.SUBMIT, {"job_id": "j", "model": "m",
                                                 "request": request})


@pytest.mark.parametrize("bad, reason", [
    ([wire.WORKER], "frame_count"),
    ([b"?", b"\x01", b"\x80"], "unknown_protocol"),
    ([wire.WORKER, b"\x00", b"\x80"], "unknown_command"),
    ([wire.PEER, bytes((msgs.Command.SUBMIT,)), b"\x80"], "command_not_allowed"),
    ([wire.WORKER, bytes((msgs.Command.HEARTBEAT,)), OVERSIZE], "oversize"),
    ([wire.WORKER, bytes((msgs.Command.HEARTBEAT,)), b"\x91" * 2000 + b"\xc0"], "undecodable"),
    ([wire.WORKER, bytes((msgs.Command.HEARTBEAT,)), b"\xd4\x05\x01"], "undecodable"),  # ext
    ([wire.WORKER, bytes((msgs.Command.HEARTBEAT,)), b"\x81\xa7running"], "undecodable"),
    ([wire.WORKER, bytes((msgs.Command.HEARTBEAT,)), b"\x01"], "not_a_map"),
    (submit({"kind": "chat", "messages": nested(MAX_DEPTH)}), "too_deep"),
    (submit({"kind": msgpack.Timestamp(1)}), "bad_type"),
    (submit({"kind": b"chat"}), "bad_type"),
    (frames(wire.GATEWAY, msgs.Command.SUBMIT, {"job_id": "j", "model": "m",
                                                "request": {b"kind": "chat"}}), "bad_key"),
    (submit({"kind": "chat", "seed": 2**64 - 1}), "bad_value"),
    (frames(wire.WORKER, msgs.Command.HEARTBEAT, {"load": {"tokens_per_s": float("nan")}}),
     "bad_value"),
    (frames(wire.PEER, msgs.Command.ANNOUNCE, {"node_id": "n", "endpoint": "e",
                                               "started": float("inf")}), "bad_value"),
    (frames(wire.WORKER, msgs.Command.HEARTBEAT, {"load": {"running": 1.5}}), "bad_type"),
    (frames(wire.WORKER, msgs.Command.HEARTBEAT, {"bogus": 1}), "unknown_field"),
    (frames(wire.WORKER, msgs.Command.PARTIAL, {"job_id": "j"}), "missing_field"),
])
def test_each_rejection_names_its_reason(bad: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode(bad, wire.TO_BROKER)
    assert info.value.reason == reason, info.value


def test_plain_data_at_the_limits_is_accepted() -> None:
    request = {"kind": "chat", "seed": 2**63 - 1, "temperature": 0.0,
               "tools": [{"schema": nested(MAX_DEPTH - 4)}], "stop": []}
    _, msg = wire.decode(submit(request), wire.TO_BROKER)
    assert isinstance(msg, msgs.Submit) and msg.request == GenerationRequest(**request)


def test_generation_request_is_validated() -> None:
    ok = GenerationRequest(kind="chat", messages=[{"role": "user", "content": "hi"}])
    assert from_dict(GenerationRequest, ok.to_dict()) == ok
    with pytest.raises(ProtocolError, match="max_tokens"):
        from_dict(GenerationRequest, {"kind": "chat", "max_tokens": "many"})
    with pytest.raises(ProtocolError, match="seed"):
        from_dict(GenerationRequest, {"kind": "chat", "seed": 1.5})


def test_a_lone_surrogate_is_not_plain_data() -> None:
    """JSON may escape one ("\\ud800"); msgpack cannot encode it, so senders check first."""
    check_plain({"text": "caf\u00e9 \U0001f600"})
    with pytest.raises(ProtocolError) as info:
        check_plain({"messages": [{"content": "a\ud800"}]})
    assert info.value.reason == "bad_value"
