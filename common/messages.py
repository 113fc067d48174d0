"""Every message of the mesh, as a dataclass: its fields are its body's keys.

How a message travels (its tag, its command byte, its msgpack body, who may send it to
whom) is :mod:`common.wire`; what any two releases read of each other is
:mod:`common.versions`. A request travels as its record,
:class:`~common.generation.GenerationRequest`.

The design follows Majordomo (MDP/0.2, streaming PARTIAL/FINAL) and Paranoid Pirate
heartbeats, plus what those lack: job ids, sequence numbers, load reports, cancellation
and epochs. Every message carries ``epoch``: brokers stamp theirs, and a peer ignores a
broker message with an epoch lower than the highest it has seen (stale-coordinator fence).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mlx_stack.common.generation import GenerationRequest

VERSION = "0.1.0"
"""This release, which READY and ANNOUNCE carry (the protocol's number is
:data:`common.wire.PROTOCOL`)."""


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
class WorkerLoad:
    """A worker's load as the worker measured it: it sends one in its READY and in every
    HEARTBEAT, the broker keeps the last one as is (routing reads ``mem_free``), and
    CONTROL ``status`` shows it inside the worker's status."""

    running: int = 0
    """Jobs the worker runs now, by its own count (the broker's, which routing uses and
    which counts a JOB still on its way, is ``WorkerStatus.running``)."""
    mem_free: int = 0
    """Bytes of memory free on the worker's machine."""
    tokens_per_s: float = 0.0
    """Tokens it generated per second since its last report."""
    kv_bytes: int = 0
    """KV cache memory the worker's engine holds (running requests and prompt cache)."""
    counters: dict[str, int] = field(default_factory=dict)
    """Its counters since it started: jobs, frames, prompt cache hits..."""
    cache_entries: int = 0
    """Entries its engine's prompt cache holds now: the broker's mirror of that cache
    (broker/prefixes.py) never claims more."""


@dataclass(kw_only=True, slots=True)
class Ready(Message):
    """worker -> broker: I serve ``model_id`` (also under its tiers) with ``slots`` slots."""

    COMMAND: ClassVar[Command] = Command.READY
    worker_id: str
    node_id: str
    model_id: str
    tiers: list[str] = field(default_factory=list)
    """The other names the model answers to (``fast``, ``standard``...)."""
    slots: int = 1
    mem_total: int = 0
    model_bytes: int = 0
    engine: str = "mlx"
    version: str = VERSION
    context_length: int = 0
    """Tokens the model attends to, prompt and answer together (0: not said), for
    ``/v1/models``: clients size their prompts by it."""
    load: WorkerLoad = field(default_factory=WorkerLoad)


@dataclass(kw_only=True, slots=True)
class Heartbeat(Message):
    """Any direction. A worker's carries its load; gateways and brokers leave it empty."""

    COMMAND: ClassVar[Command] = Command.HEARTBEAT
    session: str = ""
    """A broker's random id for its process lifetime: a change means a broker restarted or
    another took over, and whatever was open with the old one is lost."""
    load: WorkerLoad = field(default_factory=WorkerLoad)
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
    were lost. (The slot is freed by :class:`Release`, to the broker.)"""

    COMMAND: ClassVar[Command] = Command.FINAL
    job_id: str
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)
    """``prompt_tokens``, ``completion_tokens``, ``total_tokens``, and ``cached_tokens``:
    those of the prompt tokens that the worker's prompt cache served; and, for the
    RELEASE (no client sees it), ``prompt_tokens_computed``: the tokens the engine
    prefilled, a resumed job's resume tokens among them."""
    parts: int = 0
    stop_sequence: str = ""
    """The request's stop sequence that ended the answer (finish_reason ``stop``), or ""
    (an end-of-sequence token, a tool call, the length); Anthropic's API names it."""


RELEASED_WATCH_S = 60.0
"""How long a direct job's output may still be lost after its RELEASE: queued behind a
slow link on the connection to its gateway, it dies with that connection. For that long
its worker keeps watching the connection (and FAILs the jobs it lost) and the broker
remembers which gateway to tell (broker/state.py ``Released``)."""


@dataclass(kw_only=True, slots=True)
class Release(Message):
    """worker -> broker, after a job's FINAL went its way: the job ended, its slot is
    free. ``job_id`` is the dispatch id. (A FAIL frees the slot too.) It says what the
    prompt cache did for the job, which corrects the broker's guess of what that cache
    holds (broker/prefixes.py)."""

    COMMAND: ClassVar[Command] = Command.RELEASE
    job_id: str
    prompt_tokens_reused: int = 0
    """Tokens of the request's prompt that the worker's prompt cache served (FINAL's
    ``usage["cached_tokens"]``)."""
    prompt_tokens_computed: int = 0
    """Tokens the worker's engine prefilled for the job (a resumed job's resume tokens
    among them: FINAL's ``usage["prompt_tokens_computed"]``)."""


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
    (:func:`common.versions.hello`)."""


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

