"""Hypothesis strategies for hostile broker traffic: valid messages of every command,
mutated (bytes, fields, frames, tag and command), and pure random frames.

Mutations start from real encodings so that most of them get past the first checks and
exercise the later ones (field types, plain-data rules, roles), which random bytes
alone almost never reach.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import strategies as st

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.plain import MAX_DEPTH, ProtocolError

FUZZ_MODEL = "fuzz-model"
"""Every seed names this model, never the one the test serves, so a fake READY or SUBMIT
that stays valid cannot take the real worker's place or its slots."""

REQUEST = GenerationRequest(kind="chat", messages=[{"role": "user", "content": "hi"}],
                              max_tokens=3)
SEEDS: list[tuple[bytes, msgs.Message]] = [
    (wire.WORKER, msgs.Ready(worker_id="fuzz-worker", node_id="fuzz", model_id=FUZZ_MODEL,
                             tiers=["fuzz-tier"], slots=2, mem_total=2**34,
                             load=msgs.WorkerLoad(mem_free=2**33))),
    (wire.WORKER, msgs.Heartbeat(load=msgs.WorkerLoad(running=1, mem_free=5, tokens_per_s=1.5,
                                                      counters={"x": 1}))),
    (wire.WORKER, msgs.Partial(job_id="fuzz/0", token_ids=[1, 2], text="hi", seq=0)),
    (wire.WORKER, msgs.Accepted(job_id="fuzz/0", node_id="fuzz", worker_id="w", model_id="m")),
    (wire.WORKER, msgs.Final(job_id="fuzz/0", finish_reason="stop", usage={"prompt_tokens": 1})),
    (wire.WORKER, msgs.Release(job_id="fuzz/0")),
    (wire.WORKER, msgs.Fail(job_id="fuzz/0", error="boom", retryable=True)),
    (wire.WORKER, msgs.Disconnect()),
    (wire.GATEWAY, msgs.Submit(job_id="fuzz-job", model=FUZZ_MODEL, request=REQUEST,
                               node_id="fuzz", deadline=2.0)),
    (wire.GATEWAY, msgs.Submit(job_id="fuzz-again", model=FUZZ_MODEL, request=REQUEST,
                               attempt=1, resume_token_ids=[5], resume_text="x")),
    (wire.GATEWAY, msgs.Cancel(job_id="fuzz-job")),
    (wire.GATEWAY, msgs.Control(request_id="r", op="routes", args={"last": 3})),
    (wire.GATEWAY, msgs.Control(request_id="r", op="status")),
    (wire.GATEWAY, msgs.Heartbeat()),
    (wire.GATEWAY, msgs.Disconnect()),
    (wire.PEER, msgs.Announce(node_id="fuzz", endpoint="tcp://127.0.0.1:9", priority=-1,
                              started=1.0)),
    # Commands only brokers send: the broker must refuse them from anyone.
    (wire.WORKER, msgs.Job(job_id="j", request=REQUEST)),
    (wire.GATEWAY, msgs.Accepted(job_id="j", node_id="n", worker_id="w", model_id="m")),
    (wire.GATEWAY, msgs.Release(job_id="j")),
    (wire.GATEWAY, msgs.ControlReply(request_id="r", ok=True, result={"a": [1]})),
    (wire.WORKER, msgs.Redirect(endpoint="tcp://127.0.0.1:9")),
]
TAGS = [wire.WORKER, wire.GATEWAY, wire.PEER]


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -(2**63), -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1)),
)
keys = st.one_of(st.text(max_size=12), st.integers(-5, 5), st.binary(max_size=4))
hostile_values = st.one_of(
    st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
        max_leaves=12),
    st.integers(MAX_DEPTH - 2, 500).map(nested),  # msgpack packs 511 at most,
    st.integers(1, 200_000).map(lambda n: "x" * n),
)


def body_of(msg: msgs.Message) -> dict[str, Any]:
    """The body of ``msg`` as it goes on the wire (records inside as maps)."""
    return msgpack.unpackb(wire.encode(wire.WORKER, msg)[2])


@st.composite
def valid(draw: st.DrawFn) -> list[bytes]:
    tag, msg = draw(st.sampled_from(SEEDS))
    return wire.encode(tag, msg)


@st.composite
def field_mutation(draw: st.DrawFn) -> list[bytes]:
    """A seed with fields replaced, deleted or added, re-encoded with msgpack."""
    tag, msg = draw(st.sampled_from(SEEDS))
    body: dict[Any, Any] = body_of(msg)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "add" or not body:
            body[draw(keys)] = draw(hostile_values)
        else:
            name = draw(st.sampled_from(sorted(body, key=repr)))
            if action == "delete":
                del body[name]
            else:
                body[name] = draw(hostile_values)
    return [tag, bytes((msg.COMMAND,)), msgpack.packb(body, use_bin_type=True)]


@st.composite
def byte_mutation(draw: st.DrawFn) -> list[bytes]:
    """A valid encoding with bytes flipped, inserted, deleted or cut in one frame."""
    frames = draw(valid())
    index = draw(st.sampled_from([2, 2, 2, 1, 0]))
    data = bytearray(frames[index])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "insert" or not data:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "flip":
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif action == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    frames[index] = bytes(data)
    return frames


@st.composite
def frame_mutation(draw: st.DrawFn) -> list[bytes]:
    """A valid encoding with frames dropped, repeated, added, or tag/command swapped."""
    frames = draw(valid())
    action = draw(st.sampled_from(["drop", "repeat", "add", "tag", "command"]))
    if action == "drop":
        del frames[draw(st.integers(0, 2))]
    elif action == "repeat":
        frames.insert(0, frames[draw(st.integers(0, 2))])
    elif action == "add":
        frames.insert(draw(st.integers(0, 3)), draw(st.binary(max_size=16)))
    elif action == "tag":
        frames[0] = draw(st.sampled_from([*TAGS, b"", b"MLXS-W3", b"MLXS-G4\x00"]))
    else:
        frames[1] = draw(st.one_of(st.sampled_from([bytes((c,)) for c in msgs.Command]),
                                   st.binary(max_size=3)))
    return frames if frames else [b""]


random_frames = st.lists(st.binary(max_size=64), min_size=1, max_size=5)
hostile_frames = st.one_of(valid(), field_mutation(), byte_mutation(), frame_mutation(),
                           random_frames)
"""What the fuzz test throws: every kind of mutation, and some valid messages among
them so the broker's state changes while garbage arrives."""


def harmless(frames: list[bytes]) -> list[bytes]:
    """``frames``, except that a valid ANNOUNCE never claims to coordinate: a well-formed
    impostor broker is stopped by the mesh secret (CURVE), not by validation, and would
    rightly take the mesh over here."""
    try:
        tag, msg = wire.decode(frames, wire.TO_BROKER)
    except ProtocolError:
        return frames
    if isinstance(msg, msgs.Announce) and msg.coordinator:
        msg.coordinator = False
        return wire.encode(tag, msg)
    return frames
