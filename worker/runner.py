"""One job's life on a worker: resume seam, tool calls, stop sequences, usage, cancellation.

A :class:`JobRun` turns the tokens an engine samples for one job into PARTIALs and one
FINAL (or a retryable FAIL when cancelled). The batch loop (:mod:`worker.batch`) feeds it.
The text goes through two scanners: tool calls are cut out and parsed first (when the
request has tools, :mod:`worker.tools`), then stop sequences are looked for in the
content that is left.

A resumed job (``resume_token_ids`` set) continues a stream that another worker began.
The client has seen ``resume_text``; a streaming detokenizer holds back bytes of an
unfinished character or word, so the tokens sent can run ahead of the text sent. The new
worker therefore feeds the resume tokens to its own detokenizer, first sends whatever of
their text the client has not seen, and scans for stop sequences across the seam. Tool
calls among the resume tokens are parsed again, not sent again: the next call gets the
next index.
"""

from __future__ import annotations

from collections.abc import Callable

from mlx_stack.common.messages import ErrorCode, Fail, Final, Job, Message, Partial
from mlx_stack.worker.engine import Engine, RequestRefused
from mlx_stack.worker.tools import ToolScanner


class _StopScanner:
    """Releases text once no stop sequence can still begin inside it."""

    def __init__(self, stops: list[str], sent: int) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = sent

    def release(self, text: str, final: bool) -> tuple[str, str | None]:
        """The next piece of ``text`` to send, and the stop sequence that ended it (the
        earliest in the text), if one did."""
        start = max(0, self.sent - self.hold)
        hits = [(i, s) for s in self.stops if (i := text.find(s, start)) >= 0]
        stopped = None
        if hits:
            at, stopped = min(hits)
            end = max(at, self.sent)
        else:
            end = len(text) if final else max(self.sent, len(text) - self.hold)
        piece = text[self.sent:end]
        self.sent = end
        return piece, stopped


class JobRun:
    """One job from its JOB to its FINAL: ``prompt`` and ``budget`` are what the engine
    runs; :meth:`add` takes each sampled token, :meth:`end` the engine's end of the
    sequence, :meth:`cancel` a cancellation. Each sends what the client is owed."""

    def __init__(self, engine: Engine, job: Job, send: Callable[[Message], None]) -> None:
        self.job_id = job.job_id
        self.send = send
        """Where this job's messages go."""
        request = job.request
        self.request = request
        self._prompt = engine.encode_prompt(request)
        self._resume = list(job.resume_token_ids)
        self.prompt = self._prompt + self._resume
        """What the engine continues: the request's prompt and the tokens already sent."""
        self.prompt_len = len(self._prompt)
        """Where the request's own prompt ends in :attr:`prompt`."""
        room = engine.context_length - self.prompt_len
        if room <= 0:
            raise RequestRefused("messages" if request.kind == "chat" else "prompt",
                                 f"the prompt has {self.prompt_len} tokens, and "
                                 f"{engine.model_id} reads at most {engine.context_length} "
                                 "(prompt and answer together); send a shorter one")
        self.budget = min(request.max_tokens, room) - len(self._resume)
        """Tokens the engine may still generate: what the request asked, within the
        model's context."""
        self.new_tokens = 0
        self.reused = 0
        """Tokens of :attr:`prompt` that the engine's prompt cache served, once it took
        the job."""
        self._tools = None
        if request.tools:
            if engine.tool_format is None:
                raise RequestRefused("tools", f"the chat template of {engine.model_id} has "
                                     "no tool calling; use a model whose template has, or "
                                     "send the request without tools")
            self._tools = ToolScanner(engine.tool_format, request.tools)
        self._detok = engine.detokenizer(request)
        for token in self._resume:
            self._detok.add_token(token)
        self._content = ""
        """The output without its tool calls: what stop sequences are looked for in."""
        self._calls: list[dict] = []
        self._scan(final=False)
        self._calls.clear()  # made before the resume seam: the client has them
        self._scanner = _StopScanner(request.stop, sent=len(job.resume_text))
        self._pending: list[int] = []
        self._logprobs: list[dict] = []
        self._stop_sequence = ""
        """The stop sequence that ended the answer, once one has."""

    def open(self) -> bool:
        """Send what the resume seam owes the client; False when that already ended the job
        (a stop sequence completed by the resume tokens' held-back text, or no budget left)."""
        if self._flush(final=False):
            self._final("stop")
            return False
        if self.budget <= 0:
            self.end(eos=False)
            return False
        return True

    def add(self, token: int, logprob: dict | None = None) -> bool:
        """A new token (with its log-probability entry if the request asked); True when a
        stop sequence, or the one tool call a request without parallel tool calls may
        make, ended the job (FINAL sent: drop the sequence from the engine)."""
        self.new_tokens += 1
        self._pending.append(token)
        if logprob is not None:
            self._logprobs.append(logprob)
        self._detok.add_token(token)
        if self._flush(final=False):
            self._final("stop")
            return True
        return False

    def end(self, eos: bool) -> None:
        """The engine ended the sequence: at an end-of-sequence token, or out of budget."""
        self._detok.finalize()
        stopped = self._flush(final=True)
        self._final("stop" if eos or stopped else "length")

    def cancel(self) -> None:
        """Not a normal end: a FAIL, so that a job the broker still expects (given up here
        because the broker seemed lost) is run again rather than reported complete."""
        self.send(Fail(job_id=self.job_id, error="cancelled", code=ErrorCode.CANCELLED,
                        retryable=True))

    def _scan(self, final: bool) -> None:
        """Move new output text into content and tool calls."""
        if self._tools is None:
            self._content = self._detok.text
            return
        content, calls = self._tools.feed(self._detok.text, final)
        self._content += content
        self._calls += calls

    def _flush(self, final: bool) -> bool:
        self._scan(final)
        text, stopped = self._scanner.release(self._content, final)
        if stopped is not None:
            self._stop_sequence = stopped
        if text or self._pending or self._calls:
            self.send(Partial(job_id=self.job_id, token_ids=list(self._pending), text=text,
                              tool_calls=list(self._calls), logprobs=list(self._logprobs)))
            self._pending.clear()
            self._calls.clear()
            self._logprobs.clear()
        one_call = (self._tools is not None and self._tools.calls > 0
                    and not self.request.parallel_tool_calls)
        return stopped is not None or one_call

    def _final(self, finish_reason: str) -> None:
        if finish_reason == "stop" and self._tools is not None and self._tools.calls:
            finish_reason = "tool_calls"
        completion = len(self._resume) + self.new_tokens
        self.send(Final(job_id=self.job_id, finish_reason=finish_reason,
                        stop_sequence=self._stop_sequence, usage={
            "prompt_tokens": len(self._prompt),
            "completion_tokens": completion,
            "total_tokens": len(self._prompt) + completion,
            # of the request's own prompt: a resumed job's cache may serve its resume
            # tokens too, which the usage counts as completion tokens
            "cached_tokens": min(self.reused, len(self._prompt)),
            "prompt_tokens_computed": len(self.prompt) - self.reused,
        }))
