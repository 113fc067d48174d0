"""One request's attempts, as a pure state machine: what each message of a job means for
the request, and whether a lost job is submitted again. No sockets, no clock: the broker
client (gateway/client.py) feeds it the messages of each attempt and does what it says,
so the rules (resume from what the client has seen, which losses count against
``max_retries``, when the request has started) are tested without I/O, as the broker's
job table is.

A request's **job stream**, what :meth:`gateway.client.BrokerClient.run` yields, is one
:class:`Served` once a worker has started the request (its ACCEPTED), the :class:`Piece` s
of its output, and one :class:`Done`; or :class:`JobError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from mlx_stack.common import messages as msgs
from mlx_stack.gateway.inbox import Lost, dispatch_of

RESUBMIT_CODES = frozenset({msgs.ErrorCode.WORKER_LOST})
"""Failures after which the request goes on elsewhere (the rest end it)."""


class JobError(Exception):
    """A request that cannot complete; ``code`` is a :class:`common.messages.ErrorCode`."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        """The request field at fault, if one is."""


@dataclass(frozen=True, slots=True)
class Served:
    """A job stream's first event: a worker has started the request (its ACCEPTED came,
    before the prefill), and where it runs. Until then a refusal (a format the worker
    cannot honour) is still an HTTP error, not an error event in a stream already
    answered 200."""

    node_id: str
    worker_id: str
    model_id: str


@dataclass(frozen=True, slots=True)
class Piece:
    """More output: ``text``, how many tokens it holds, and the tool calls it completed
    (``{"index", "id", "name", "arguments"}``)."""

    text: str
    tokens: int
    tool_calls: list[dict[str, Any]]
    logprobs: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Done:
    """A job stream's last event: why generation stopped, and the token counts."""

    finish_reason: str
    usage: dict[str, int]
    stop_sequence: str = ""
    """The stop sequence that ended the answer, if one did (see ``protocol.Final``)."""


JobEvent = Served | Piece | Done
"""What a job stream yields: one Served, Pieces, one Done."""


class JobStream:
    """A request's job stream as a handler reads it: ``await started()`` once (where the
    request runs; or the :class:`JobError` that ended it before a worker started it),
    then its Pieces and its Done by ``async for``."""

    def __init__(self, events: AsyncIterator[JobEvent]) -> None:
        self._events = events

    async def started(self) -> Served:
        served = await anext(self._events)
        assert isinstance(served, Served), "a job stream begins with Served"
        return served

    def __aiter__(self) -> AsyncIterator[JobEvent]:
        return self._events


@dataclass(frozen=True, slots=True)
class Resubmit:
    """This attempt is over without an answer: submit the request again. ``kind`` names
    the failover in the metrics (``mid_stream``, ``coordinator``, ``lost_frame``)."""

    kind: str
    reason: str


REDISPATCHED = "redispatched"
"""The coordinator gave the attempt to another worker before its first output (another
worker's ACCEPTED): counted as a ``pre_token`` failover, nothing for the client."""

Step = JobEvent | Resubmit | str | None
"""What :meth:`Attempts.apply` says to do with a message: yield an event, resubmit,
count a re-dispatch, or nothing."""


class Attempts:
    """Everything one request has been through: the output the client has been sent (the
    resume point of the next attempt), its submissions and the workers lost under it."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.submitted = 0
        """Submissions so far (SUBMIT.attempt > 0 lets a resubmission past the queue
        bound)."""
        self.lost_workers = 0
        """Attempts whose worker died under them: the only losses that count against
        ``max_retries``. A lost or restarted broker, a redirect or a lost frame is the
        mesh's doing and costs the request nothing but time (its deadline still holds);
        workers dying one after the other under the same request may be its own doing."""
        self.started = False
        """Whether the client has been told the request started (:class:`Served`)."""
        self.ended = False
        """Whether the current attempt ended in a FINAL or a refusal (no CANCEL owed)."""
        self._dispatch = 0
        """The current attempt's dispatch that a worker started last (its ACCEPTED): a
        later one means the coordinator re-dispatched it (``<job id>/<n>`` counts them)."""

    def submission(self) -> dict[str, Any]:
        """The SUBMIT fields of the next attempt: resume from what the client has seen."""
        self._dispatch, self.ended = 0, False
        return {"resume_token_ids": self.token_ids, "resume_text": "".join(self.text),
                "attempt": self.submitted}

    def apply(self, msg: msgs.Message | Lost) -> list[Step]:
        """What ``msg``, the next message of the current attempt, means; raises
        :class:`JobError` when the request ends in an error."""
        match msg:
            case Lost():
                return [Resubmit(msg.kind, msg.reason)]
            case msgs.Fail() if msg.retryable and msg.code in RESUBMIT_CODES:
                return [Resubmit("mid_stream", msg.error)]
            case msgs.Fail():
                self.ended = True
                raise JobError(msg.code, msg.error, msg.param or None)
            case msgs.Accepted():
                number = dispatch_of(msg.job_id) or 0
                steps: list[Step] = [REDISPATCHED] * (number - self._dispatch)
                self._dispatch = number
                if not self.started:  # else a resubmission: the client had its answer
                    self.started = True
                    steps.append(Served(msg.node_id, msg.worker_id, msg.model_id))
                return steps
            case msgs.Partial():
                self.token_ids.extend(msg.token_ids)
                self.text.append(msg.text)
                return [Piece(msg.text, len(msg.token_ids), msg.tool_calls, msg.logprobs)]
            case msgs.Final():
                self.ended = True
                return [Done(msg.finish_reason, msg.usage, msg.stop_sequence)]
        return []

    def resubmit(self, why: Resubmit) -> None:
        """Count the attempt that ``why`` ended; raises :class:`JobError` when the workers
        lost under the request pass ``max_retries``."""
        self.submitted += 1
        if why.kind == "mid_stream":
            self.lost_workers += 1
            if self.lost_workers > self.max_retries:
                raise JobError(msgs.ErrorCode.WORKER_LOST, (
                    f"gave up after {self.lost_workers} workers were lost under this "
                    f"request (max_retries={self.max_retries}); last error: {why.reason}"))
