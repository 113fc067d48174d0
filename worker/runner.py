"""Running one job on an engine: resume seam, stop sequences, usage, cancellation.

A resumed job (``resume_token_ids`` set) continues a stream that another worker began.
The client has seen ``resume_text``; a streaming detokenizer holds back bytes of an
unfinished character or word, so the tokens sent can run ahead of the text sent. The new
worker therefore feeds the resume tokens to its own detokenizer, first sends whatever of
their text the client has not seen, and scans for stop sequences across the seam.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common.protocol import (
    ErrorCode,
    Fail,
    Final,
    GenerationRequest,
    Job,
    Message,
    Partial,
    from_dict,
)
from worker.engine import Engine


@dataclass(slots=True)
class Outcome:
    """How a job ended, for the worker's counters."""

    finish_reason: str
    new_tokens: int


class _StopScanner:
    """Releases text once no stop sequence can still begin inside it."""

    def __init__(self, stops: list[str], sent: int) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = sent

    def release(self, text: str, final: bool) -> tuple[str, bool]:
        """The next piece of ``text`` to send, and whether a stop sequence ended it."""
        start = max(0, self.sent - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end, stopped = max(min(hits), self.sent), True
        else:
            end, stopped = (len(text) if final else max(self.sent, len(text) - self.hold)), False
        piece = text[self.sent:end]
        self.sent = end
        return piece, stopped


def _cancelled(job: Job) -> Fail:
    """Not a normal end: a FAIL, so that a job the broker still expects (given up here
    because the broker seemed lost) is run again rather than reported complete."""
    return Fail(job_id=job.job_id, error="cancelled", code=ErrorCode.CANCELLED,
                retryable=True)


def run_job(
    engine: Engine, job: Job, cancelled: Callable[[], bool], send: Callable[[Message], None]
) -> Outcome:
    """Generate ``job`` on ``engine``, sending PARTIALs then one FINAL through ``send``
    (a retryable FAIL instead if ``cancelled()`` turns true)."""
    if cancelled():  # cancelled while it waited for this engine thread
        send(_cancelled(job))
        return Outcome("cancelled", 0)
    request = from_dict(GenerationRequest, job.request)
    prompt = engine.encode_prompt(request)
    resume = list(job.resume_token_ids)
    detok = engine.detokenizer()
    for token in resume:
        detok.add_token(token)
    scanner = _StopScanner(request.stop, sent=len(job.resume_text))
    finish = "length"
    pending: list[int] = []
    new_tokens = 0

    def flush(final: bool) -> bool:
        text, stopped = scanner.release(detok.text, final)
        if text or pending:
            send(Partial(job_id=job.job_id, token_ids=list(pending), text=text))
            pending.clear()
        return stopped

    if flush(final=False):  # a stop sequence completed by the resume tokens' held-back text
        finish = "stop"
    else:
        budget = request.max_tokens - len(resume)
        for token in engine.generate(prompt + resume, request, budget) if budget > 0 else ():
            if cancelled():
                finish = "cancelled"
                break
            new_tokens += 1
            pending.append(token)
            detok.add_token(token)
            if flush(final=False):
                finish = "stop"
                break
        else:
            if budget > 0 and new_tokens < budget:
                finish = "stop"  # end of sequence
            detok.finalize()
            if flush(final=True):
                finish = "stop"
    if finish == "cancelled":
        send(_cancelled(job))
        return Outcome(finish, new_tokens)
    send(Final(job_id=job.job_id, finish_reason=finish, usage={
        "prompt_tokens": len(prompt),
        "completion_tokens": len(resume) + new_tokens,
        "total_tokens": len(prompt) + len(resume) + new_tokens,
    }))
    return Outcome(finish, new_tokens)
