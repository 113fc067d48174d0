"""How a message travels: tags, framing, who may send what, encode and decode.

Every message on a mesh socket is the ZeroMQ routing envelope followed by exactly three
frames: ``[protocol, command, body]``.

* ``protocol`` names the kind of peer and the protocol version (one tag for gateways, one
  for workers, one for broker peers), so a single broker ROUTER can tell them apart and a
  peer speaking another version is rejected instead of misread.
* ``command`` is one byte (see :class:`~common.messages.Command`).
* ``body`` is one msgpack map whose keys are the fields of the command's dataclass
  (:mod:`common.messages`).

Nothing received is trusted: :func:`decode` checks the tag, the command, the size, the
msgpack type and every field's type, and raises :class:`~common.plain.ProtocolError`,
which callers count (by its ``reason``) and drop. Bodies carry plain data only: maps with
string keys, lists, strings, booleans, nil, 64-bit signed integers and finite floats,
nested at most :data:`~common.plain.MAX_DEPTH` deep; no binary, ext types or timestamps.
Fields typed ``Any`` (a request's messages, control arguments) are held to the same rule,
so what a broker forwards is something every peer can decode and re-encode. A request
travels as its record, :class:`~common.generation.GenerationRequest`, checked once where
it is decoded.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import msgpack

from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.messages import (
    Accepted,
    Announce,
    Cancel,
    Command,
    Control,
    ControlReply,
    Disconnect,
    Fail,
    Final,
    Heartbeat,
    Job,
    Message,
    Partial,
    Ready,
    Redirect,
    Release,
    Submit,
    WorkerLoad,
)
from mlx_stack.common.plain import ProtocolError, from_dict

PROTOCOL = int(os.environ.get("MLX_STACK_TEST_PROTOCOL") or 6)
"""This release's protocol version, the number in every tag. (3: workers stream to
gateways directly; worker messages name their dispatch all the way. 4: READY's tiers and
context length, FINAL's stop sequence, the status of tiers, ANNOUNCE's version: a node of
3 and one of 4 do not talk. 5: READY and HEARTBEAT carry the worker's load as one record,
:class:`~common.messages.WorkerLoad`; one way out for each job: the worker's ACCEPTED
opens it, FINAL takes it too, RELEASE frees the slot. 6: RELEASE says the prompt tokens
the worker's cache served and those it computed, the load its prompt cache's entries: a
node of 5 would drop such a frame as having unknown fields, the worker's every
heartbeat with them.) ``MLX_STACK_TEST_PROTOCOL`` is a
switch for tests only: it makes this code speak another version, as a build of another
release would, for the version-skew tests; never set it on a Mac that serves."""
GATEWAY = b"MLXS-G%d" % PROTOCOL
"""Protocol tag of gateway <-> broker traffic."""
WORKER = b"MLXS-W%d" % PROTOCOL
"""Protocol tag of worker <-> broker and worker -> gateway traffic."""
PEER = b"MLXS-B%d" % PROTOCOL
"""Protocol tag of broker <-> broker traffic."""
PROTOCOLS = frozenset({GATEWAY, WORKER, PEER})

MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest body accepted; also set as the sockets' ZMQ_MAXMSGSIZE so oversize is cut early."""


MESSAGES: dict[Command, type[Message]] = {
    cls.COMMAND: cls
    for cls in (Ready, Heartbeat, Partial, Final, Release, Fail, Disconnect, Job, Cancel,
                Submit, Accepted, Control, ControlReply, Redirect, Announce)
}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGES.values()}


class Allowed:
    """Which commands one side may receive on each protocol tag, as a lookup table:
    ``(tag, command byte) -> message class``. Anything else is a ProtocolError."""

    def __init__(self, by_protocol: dict[bytes, frozenset[Command]]) -> None:
        self.by_protocol = by_protocol
        self.table = {(tag, bytes((cmd,))): MESSAGES[cmd]
                      for tag, cmds in by_protocol.items() for cmd in cmds}

    def reject(self, protocol: bytes, command: bytes) -> ProtocolError:
        """Why ``(protocol, command)`` is not in the table."""
        if protocol not in self.by_protocol:
            return ProtocolError(f"unknown protocol tag {protocol[:16]!r}", "unknown_protocol")
        if len(command) != 1 or command[0] not in Command._value2member_map_:
            return ProtocolError(f"unknown command {command[:4]!r}", "unknown_command")
        return ProtocolError(f"command {Command(command[0]).name} not allowed on "
                             f"{protocol.decode()}", "command_not_allowed")


TO_BROKER = Allowed({
    WORKER: frozenset({Command.READY, Command.HEARTBEAT, Command.ACCEPTED, Command.PARTIAL,
                       Command.FINAL, Command.RELEASE, Command.FAIL, Command.DISCONNECT}),
    GATEWAY: frozenset({Command.SUBMIT, Command.CANCEL, Command.HEARTBEAT, Command.CONTROL,
                        Command.DISCONNECT}),
    PEER: frozenset({Command.ANNOUNCE}),
})
FROM_BROKER = Allowed({
    WORKER: frozenset({Command.JOB, Command.CANCEL, Command.HEARTBEAT, Command.DISCONNECT,
                       Command.REDIRECT}),
    GATEWAY: frozenset({Command.ACCEPTED, Command.PARTIAL, Command.FINAL, Command.FAIL,
                        Command.HEARTBEAT, Command.CONTROL_REPLY, Command.DISCONNECT,
                        Command.REDIRECT}),
    PEER: frozenset({Command.ANNOUNCE}),
})
TO_GATEWAY = Allowed({WORKER: frozenset({Command.ACCEPTED, Command.PARTIAL, Command.FINAL})})
"""What a gateway's stream socket takes: the output workers send it directly."""
_COMMAND_BYTES = {cmd: bytes((cmd,)) for cmd in Command}


def encode(protocol: bytes, message: Message) -> list[bytes]:
    """The three frames of ``message`` (without routing envelope)."""
    body = {name: getattr(message, name) for name in _FIELDS[type(message)]}
    return [protocol, _COMMAND_BYTES[message.COMMAND],
            msgpack.packb(body, use_bin_type=True, default=_record)]


def _record(value: Any) -> dict[str, Any]:
    """msgpack's hook for what it cannot pack itself: a record in a field typed so (a
    :class:`GenerationRequest` in ``request``, a :class:`WorkerLoad` in ``load``), as the
    map of its fields. The only records a message carries; anything else is a bug,
    refused here rather than sent."""
    if type(value) is GenerationRequest:
        return value.to_dict()
    if type(value) is WorkerLoad:
        return {name: getattr(value, name) for name in _LOAD_FIELDS}
    raise TypeError(f"cannot send a {type(value).__name__} in a message")


_LOAD_FIELDS = tuple(f.name for f in dataclasses.fields(WorkerLoad))


def decode(frames: list[bytes], allowed: Allowed) -> tuple[bytes, Message]:
    """Parse and validate three frames that ``allowed`` permits.

    Raises :class:`ProtocolError` for anything malformed: wrong frame count, unknown tag or
    command, oversize or undecodable body, data that is not plain (see the module
    docstring), missing, unknown or mistyped fields.
    """
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}", "frame_count")
    protocol, command, body = frames
    cls = allowed.table.get((protocol, command))
    if cls is None:
        raise allowed.reject(protocol, command)
    return protocol, from_dict(cls, read_map(body))  # checks plain data and types at once


def read_map(body: bytes) -> dict[Any, Any]:
    """The msgpack map in ``body``, not yet checked; :class:`ProtocolError` if none."""
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}", "oversize")
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable body: {exc!r}"[:200], "undecodable") from None
    if type(data) is not dict:
        raise ProtocolError("body is not a map", "not_a_map")
    return data


def submitted_job(frames: list[bytes]) -> str | None:
    """The job id of a gateway's SUBMIT that did not decode, if it can be read: the broker
    refuses such a request at once (a newer gateway's field, a bad value) instead of
    leaving its client to wait out the deadline. None for anything else."""
    if len(frames) != 3 or frames[:2] != [GATEWAY, _COMMAND_BYTES[Command.SUBMIT]]:
        return None
    try:
        job_id = read_map(frames[2]).get("job_id")
    except ProtocolError:
        return None
    return job_id if type(job_id) is str and 0 < len(job_id) <= 200 else None


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not part of the protocol")

