"""The mesh wire protocol, described once.

Every message on a mesh socket is the ZeroMQ routing envelope followed by exactly three
frames: ``[protocol, command, body]``.

* ``protocol`` names the kind of peer and the protocol version (one tag for gateways, one
  for workers, one for broker peers), so a single broker ROUTER can tell them apart and a
  peer speaking another version is rejected instead of misread.
* ``command`` is one byte (see :class:`Command`).
* ``body`` is one msgpack map whose keys are the fields of the command's dataclass.

The design follows Majordomo (MDP/0.2, streaming PARTIAL/FINAL) and Paranoid Pirate
heartbeats, plus what those lack: job ids, sequence numbers, load reports, cancellation
and epochs. Every message carries ``epoch``: brokers stamp theirs, and a peer ignores a
broker message with an epoch lower than the highest it has seen (stale-coordinator fence).

Nothing received is trusted: :func:`decode` checks the tag, the command, the size, the
msgpack type and every field's type, and raises :class:`ProtocolError`, which callers
count (by its ``reason``) and drop. Bodies carry plain data only: maps with string keys,
lists, strings, booleans, nil, 64-bit signed integers and finite floats, nested at most
:data:`MAX_DEPTH` deep; no binary, ext types or timestamps. Fields typed ``Any`` (a
request's messages, control arguments) are held to the same rule, so what a broker
forwards is something every peer can decode and re-encode. A request travels as its
record, :class:`~common.generation.GenerationRequest`, checked once where it is decoded.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

from common.generation import GenerationRequest
from common.plain import INT_MAX as INT_MAX
from common.plain import INT_MIN as INT_MIN
from common.plain import MAX_DEPTH as MAX_DEPTH
from common.plain import ProtocolError as ProtocolError
from common.plain import check_plain as check_plain
from common.plain import from_dict as from_dict

PROTOCOL = int(os.environ.get("MLX_STACK_TEST_PROTOCOL") or 5)
"""This release's protocol version, the number in every tag. (3: workers stream to
gateways directly; worker messages name their dispatch all the way. 4: READY's tiers and
context length, FINAL's stop sequence, the status of tiers, ANNOUNCE's version: a node of
3 and one of 4 do not talk. 5: one way out for each job: the worker's ACCEPTED opens it,
FINAL takes it too, RELEASE frees the seat.) ``MLX_STACK_TEST_PROTOCOL`` is a switch for
tests only: it makes this code speak another version, as a build of another release
would, for the version-skew tests; never set it on a Mac that serves."""
GATEWAY = b"MLXS-G%d" % PROTOCOL
"""Protocol tag of gateway <-> broker traffic."""
WORKER = b"MLXS-W%d" % PROTOCOL
"""Protocol tag of worker <-> broker and worker -> gateway traffic."""
PEER = b"MLXS-B%d" % PROTOCOL
"""Protocol tag of broker <-> broker traffic."""
PROTOCOLS = frozenset({GATEWAY, WORKER, PEER})

MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest body accepted; also set as the sockets' ZMQ_MAXMSGSIZE so oversize is cut early."""
VERSION = "0.1.0"

T = TypeVar("T")


class Command(enum.IntEnum):
    """One-byte command codes. Names are normative (MESH.md), values are ours."""

    READY = 0x01
    HEARTBEAT = 0x02
    PARTIAL = 0x03
    FINAL = 0x04
    FAIL = 0x05
    DISCONNECT = 0x06
    JOB = 0x07
    CANCEL = 0x08
    SUBMIT = 0x09
    ACCEPTED = 0x0A
    CONTROL = 0x0B
    CONTROL_REPLY = 0x0C
    REDIRECT = 0x0D
    ANNOUNCE = 0x0E
    RELEASE = 0x0F


@dataclass(kw_only=True, slots=True)
class Message:
    """Base of every message; ``epoch`` is the sending broker's epoch (0 from non-brokers)."""

    COMMAND: ClassVar[Command]
    epoch: int = 0


@dataclass(kw_only=True, slots=True)
class Ready(Message):
    """worker -> broker: I serve ``model_id`` (also under its tiers) with ``slots`` seats."""

    COMMAND: ClassVar[Command] = Command.READY
    worker_id: str
    node_id: str
    model_id: str
    tiers: list[str] = field(default_factory=list)
    """The other names the model answers to (``fast``, ``standard``...)."""
    slots: int = 1
    mem_total: int = 0
    mem_free: int = 0
    model_bytes: int = 0
    engine: str = "mlx"
    version: str = VERSION
    context_length: int = 0
    """Tokens the model attends to, prompt and answer together (0: not said), for
    ``/v1/models``: clients size their prompts by it."""


@dataclass(kw_only=True, slots=True)
class Heartbeat(Message):
    """Any direction. Workers add their load report; gateways and brokers send it empty."""

    COMMAND: ClassVar[Command] = Command.HEARTBEAT
    session: str = ""
    """A broker's random id for its process lifetime: a change means a broker restarted or
    another took over, and whatever was open with the old one is lost."""
    running: int = 0
    """Jobs the worker runs now."""
    mem_free: int = 0
    tokens_per_s: float = 0.0
    kv_bytes: int = 0
    """KV cache memory the worker's engine holds (running requests and prompt cache)."""
    counters: dict[str, int] = field(default_factory=dict)
    streamed: list[str] = field(default_factory=list)
    """Dispatch ids of the worker's jobs whose first output went straight to their gateway
    since its last heartbeat: from now on only the gateway may resume them. (Told here,
    not per job: a message to the broker beside every first token cost that token a
    fifth of a millisecond on the 2-vCPU test VM. Until then, a job whose worker dies is
    run again from its start, and the gateway, which saw output, resumes it instead.)"""


@dataclass(kw_only=True, slots=True)
class Partial(Message):
    """worker -> gateway, by the job's way (:attr:`Job.reply_to`): more of a job's output.
    ``job_id`` is the dispatch id (``<job id>/<n>``, see :class:`Job`); ``seq`` counts
    from 0 per dispatch, numbered in one place (worker/ways.py): a gap tells the gateway a
    frame was lost."""

    COMMAND: ClassVar[Command] = Command.PARTIAL
    job_id: str
    token_ids: list[int]
    text: str
    seq: int = 0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Tool calls completed in this output, parsed by the worker: each ``{"index", "id",
    "name", "arguments"}`` (arguments as a JSON string, as OpenAI sends them)."""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    """When the request asked: one entry per token of ``token_ids``, in OpenAI's shape
    (``{"token", "logprob", "bytes", "top_logprobs"}``)."""

    def absorb(self, later: Partial) -> None:
        """Take in the output of the PARTIAL that follows this one: one SSE event for
        what came together (gateway/inbox.py)."""
        self.token_ids = self.token_ids + later.token_ids
        self.text += later.text
        self.tool_calls = self.tool_calls + later.tool_calls
        self.logprobs = self.logprobs + later.logprobs


@dataclass(kw_only=True, slots=True)
class Final(Message):
    """worker -> gateway, by the job's way, after its last PARTIAL: the job ended
    normally. ``parts`` is how many PARTIALs the dispatch sent: fewer taken means some
    were lost. (The seat is freed by :class:`Release`, to the broker.)"""

    COMMAND: ClassVar[Command] = Command.FINAL
    job_id: str
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)
    parts: int = 0
    stop_sequence: str = ""
    """The request's stop sequence that ended the answer (finish_reason ``stop``), or ""
    (an end-of-sequence token, a tool call, the length); Anthropic's API names it."""


@dataclass(kw_only=True, slots=True)
class Release(Message):
    """worker -> broker, after a job's FINAL went its way: the job ended, its seat is
    free. ``job_id`` is the dispatch id. (A FAIL frees the seat too.)"""

    COMMAND: ClassVar[Command] = Command.RELEASE
    job_id: str


@dataclass(kw_only=True, slots=True)
class Fail(Message):
    """The job failed. ``retryable`` says whether another attempt may succeed; ``code`` is an
    error code from :class:`ErrorCode` the gateway maps to an HTTP status."""

    COMMAND: ClassVar[Command] = Command.FAIL
    job_id: str
    error: str
    code: str = "internal_error"
    retryable: bool = False
    param: str = ""
    """The request field at fault, if one is (an OpenAI error's ``param``)."""


@dataclass(kw_only=True, slots=True)
class Disconnect(Message):
    """Either direction: what the other side held for this connection is gone; ``reason``
    (a :class:`Reason`) says why. The receiver's answer is the same for every reason (a
    worker registers again, a gateway resubmits its open jobs); the reason is for logs."""

    COMMAND: ClassVar[Command] = Command.DISCONNECT
    reason: str = ""


class Reason(enum.StrEnum):
    """Why a :class:`Disconnect` was sent."""

    LEAVING = "leaving"
    """The sender is shutting down."""
    UNKNOWN = "unknown"
    """This broker does not know you (it restarted, or purged you): register again."""
    COORDINATING = "coordinating"
    """This broker coordinates now: register and resubmit here."""
    STEPPED_DOWN = "stepped_down"
    """This broker stopped coordinating and knows no coordinator yet."""
    JOBS_DROPPED = "jobs_dropped"
    """You were silent past the liveness and your jobs were dropped: resubmit them."""


@dataclass(kw_only=True, slots=True)
class Job(Message):
    """broker -> worker: run ``request``. With resume tokens, continue a stream that another
    worker started: the tokens are appended to the prompt, ``resume_text`` is what the
    client has already seen of them.

    ``job_id`` is the dispatch id, ``<job id>/<n>`` for the job's n-th dispatch: frames of
    an earlier dispatch (a worker that was purged but was only slow) never pass for the
    current one."""

    COMMAND: ClassVar[Command] = Command.JOB
    job_id: str
    request: GenerationRequest
    request_id: str = ""
    """The HTTP request's id (``x-request-id``), for logs."""
    resume_token_ids: list[int] = field(default_factory=list)
    resume_text: str = ""
    reply_to: str = ""
    """The gateway's stream endpoint (:attr:`Submit.reply_to`), when this worker can reach
    it: the job's way out is straight there, not through the broker (which would add a
    hop to every token). Empty: the broker relays it. Either way, every frame of the
    dispatch (ACCEPTED, PARTIALs, FINAL) takes the one way, so they arrive in order."""


@dataclass(kw_only=True, slots=True)
class Cancel(Message):
    """gateway -> broker -> worker: stop the job, nobody is listening."""

    COMMAND: ClassVar[Command] = Command.CANCEL
    job_id: str


@dataclass(kw_only=True, slots=True)
class Submit(Message):
    """gateway -> broker: run ``request`` on a worker of ``model`` (id or tier).

    ``deadline`` is the seconds left at send time, relative because the clocks of two Macs
    need not agree. ``node_id`` is the gateway's node, for the remote tie-breaker.
    ``attempt`` > 0 marks a resubmission of a request that was admitted before: it skips
    the queue bound and waits at the head of the queue."""

    COMMAND: ClassVar[Command] = Command.SUBMIT
    job_id: str
    model: str
    request: GenerationRequest
    request_id: str = ""
    """The HTTP request's id (``x-request-id``), the same for every attempt: it names the
    request in the logs of the gateway, the broker and the worker, and in the route log."""
    node_id: str = ""
    resume_token_ids: list[int] = field(default_factory=list)
    resume_text: str = ""
    deadline: float = 600.0
    attempt: int = 0
    reply_to: str = ""
    """Where workers may send this job's output straight to the gateway (a ``tcp://``
    endpoint its ROUTER binds); empty: through the broker only."""
    prefix_hashes: list[int] = field(default_factory=list)
    """The prompt's prefix chain (gateway/prefix.py): routing sends the job where a
    finished job's chain shares the most of it (the worker's prompt cache holds it)."""
    prefix_ends: list[int] = field(default_factory=list)
    """Where each block of the chain ends, in characters of the prompt."""


@dataclass(kw_only=True, slots=True)
class Accepted(Message):
    """worker -> gateway, by the job's way, its first frame: the worker's engine took the
    job (it will not be refused any more), and where it runs. ``job_id`` is the dispatch
    id (:class:`Job`). The gateway answers a stream's HTTP status and headers then, during
    the prefill, so that the first token leaves in one write, as it does from a model's
    own server."""

    COMMAND: ClassVar[Command] = Command.ACCEPTED
    job_id: str
    node_id: str
    worker_id: str
    model_id: str


@dataclass(kw_only=True, slots=True)
class Control(Message):
    """gateway/CLI -> broker: a read-only query (``op`` in status|nodes|models|routes)."""

    COMMAND: ClassVar[Command] = Command.CONTROL
    request_id: str
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class ControlReply(Message):
    """broker -> asker: the answer to a :class:`Control` with the same ``request_id``."""

    COMMAND: ClassVar[Command] = Command.CONTROL_REPLY
    request_id: str
    ok: bool
    result: Any = None
    error: str = ""


@dataclass(kw_only=True, slots=True)
class Redirect(Message):
    """standby broker -> worker/gateway: the coordinator is at ``endpoint``; connect
    there (a gateway resubmits its open jobs, a worker registers again)."""

    COMMAND: ClassVar[Command] = Command.REDIRECT
    endpoint: str


@dataclass(kw_only=True, slots=True)
class Announce(Message):
    """broker -> broker, every heartbeat interval: who I am and whether I coordinate.
    Peer liveness comes from these, never from mDNS records."""

    COMMAND: ClassVar[Command] = Command.ANNOUNCE
    node_id: str
    endpoint: str
    priority: int = 0
    started: float = 0.0
    coordinator: bool = False
    seq: int = 0
    """Counts this process's announcements: one that arrives after a later one (they
    travel on two connections) is stale and ignored."""
    models: list[str] = field(default_factory=list)
    """Model names the sender knows: a coordinator's served lately (a standby that takes
    over makes a request for one wait for the workers rather than answer 404), a
    standby's expected from its node's loading workers (the coordinator does the same)."""
    version: str = VERSION
    """The sender's release, for the advice a broker of another protocol gives
    (:func:`hello`)."""


class ErrorCode(enum.StrEnum):
    """Error codes carried by :class:`Fail`; the gateway maps each to an HTTP status."""

    MODEL_NOT_FOUND = "model_not_found"
    QUEUE_FULL = "queue_full"
    NO_WORKER = "no_worker"
    NO_BROKER = "no_broker"
    """The gateway reaches no broker at all (not: the broker has no worker)."""
    DEADLINE = "deadline_exceeded"
    WORKER_LOST = "worker_lost"
    INVALID_REQUEST = "invalid_request"
    CANCELLED = "cancelled"
    INTERNAL = "internal_error"


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
    """msgpack's hook for what it cannot pack itself: a :class:`GenerationRequest` in a
    field typed so (``request``), as the map of its fields. The only record a message
    carries; anything else is a bug, refused here rather than sent."""
    if type(value) is GenerationRequest:
        return value.to_dict()
    raise TypeError(f"cannot send a {type(value).__name__} in a message")


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
    return protocol, from_dict(cls, _map(body))  # checks plain data and types at once


def _map(body: bytes) -> dict[Any, Any]:
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
        job_id = _map(frames[2]).get("job_id")
    except ProtocolError:
        return None
    return job_id if type(job_id) is str and 0 < len(job_id) <= 200 else None


TAG = re.compile(rb"MLXS-([GWB])([0-9]{1,6})")
"""Every version's tags: ``MLXS-`` + G (gateway), W (worker) or B (broker) + the protocol
number. Frozen, like :func:`hello`'s fields: the one part of the protocol no release may
change, so that any two releases can tell each other apart."""


def tag_version(tag: bytes) -> int | None:
    """The protocol number in a tag of any version (None for anything else)."""
    match = TAG.fullmatch(tag)
    return int(match.group(2)) if match else None


@dataclass(frozen=True, slots=True)
class Hello:
    """What a broker of another protocol version says of itself in its ANNOUNCE, read
    the way every version can: its tag's number, and four fields of the body's msgpack
    map that every release's ANNOUNCE keeps (``version`` since protocol 4)."""

    protocol: int
    node_id: str
    endpoint: str
    coordinator: bool = False
    version: str = ""


def hello(frames: list[bytes]) -> Hello | None:
    """The :class:`Hello` in an ANNOUNCE of another protocol version (three frames, a
    broker tag of a number not :data:`PROTOCOL`); None for anything else. Nothing else of
    the message is read: its schema is that version's business."""
    if len(frames) != 3 or frames[1] != _COMMAND_BYTES[Command.ANNOUNCE]:
        return None
    match = TAG.fullmatch(frames[0])
    if match is None or match.group(1) != b"B" or int(match.group(2)) == PROTOCOL:
        return None
    try:
        body = _map(frames[2])
    except ProtocolError:
        return None
    node_id, endpoint = body.get("node_id"), body.get("endpoint")
    coordinator, version = body.get("coordinator", False), body.get("version", "")
    if not (type(node_id) is str and type(endpoint) is str and 0 < len(node_id) <= 200
            and 0 < len(endpoint) <= 200 and type(coordinator) is bool
            and type(version) is str and len(version) <= 40):
        return None
    return Hello(int(match.group(2)), node_id, endpoint, coordinator, version)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not part of the protocol")


