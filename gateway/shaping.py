"""OpenAI's shapes for a job's output: a chat or text completion as one JSON body, or as
server-sent events. Nothing here knows the mesh protocol: it reads a job stream's events
(:class:`gateway.client.Served`, :class:`~gateway.client.Piece`,
:class:`~gateway.client.Done`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from mlx_stack.common import messages as msgs
from mlx_stack.common.logs import log_event
from mlx_stack.gateway import errors
from mlx_stack.gateway.attempts import Done, JobError, JobEvent, Piece, Served

log = logging.getLogger("gateway")

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Whole:
    """A job's whole output, for an answer that does not stream."""

    text: str
    tool_calls: list[dict[str, Any]]
    logprobs: list[dict[str, Any]]
    done: Done


class Shape(Protocol):
    """How one API shows a job's output: streamed, or as one body."""

    def stream(self, job: AsyncIterator[JobEvent]) -> AsyncIterator[bytes]: ...

    def whole(self, answer: Whole) -> dict[str, Any]: ...


class Completion:
    """Shapes chunks and bodies of one chat or text completion, OpenAI style."""

    def __init__(self, chat: bool, request_id: str, model: str,
                 include_usage: bool = False, logprobs: bool = False) -> None:
        self.chat = chat
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self._offset = 0
        """Characters of text shown so far: a text completion's ``text_offset``."""
        self.created = int(time.time())
        self.model = model

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        obj = f"{kind}.chunk" if chunk and self.chat else kind
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def _logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        """``entries`` (the worker's chat-style log-probabilities) in this API's shape:
        chat's ``content`` list, or the columns of legacy text completions."""
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": entries, "refusal": None}
        offsets = []
        for entry in entries:
            offsets.append(self._offset)
            self._offset += len(entry["token"])
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                                 for e in entries],
                "text_offset": offsets}

    def chunk(self, text: str | None, finish_reason: str | None = None,
              role: bool = False, tool_calls: list[dict[str, Any]] | None = None,
              logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [{"index": call["index"], **function_call(call)}
                                       for call in tool_calls]
            choice = {"index": 0, "delta": delta,
                      "logprobs": self._logprobs(logprobs or []) if logprobs else None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "",
                      "logprobs": self._logprobs(logprobs) if logprobs else None,
                      "finish_reason": finish_reason}
        usage = {"usage": None} if self.include_usage else {}
        return {**self._envelope(chunk=True), "choices": [choice], **usage}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope(chunk=True), "choices": [], "usage": openai_usage(usage)}

    def stream(self, job: AsyncIterator[JobEvent]) -> AsyncIterator[bytes]:
        return sse(job, self)

    def whole(self, answer: Whole) -> dict[str, Any]:
        done = answer.done
        if self.chat:
            calls = answer.tool_calls
            message: dict[str, Any] = {"role": "assistant", "refusal": None,
                                       "content": answer.text if answer.text or not calls
                                       else None}
            if calls:
                message["tool_calls"] = [function_call(call) for call in calls]
            choice: dict[str, Any] = {
                "index": 0, "logprobs": self._logprobs(answer.logprobs),
                "finish_reason": done.finish_reason, "message": message}
        else:
            choice = {"index": 0, "text": answer.text,
                      "logprobs": self._logprobs(answer.logprobs),
                      "finish_reason": done.finish_reason}
        return {**self._envelope(chunk=False), "choices": [choice],
                "usage": openai_usage(done.usage)}


def openai_usage(usage: dict[str, int]) -> dict[str, Any]:
    """OpenAI's usage of the worker's counts: the prompt tokens its prompt cache served
    as ``prompt_tokens_details.cached_tokens``, as OpenAI reports its own cache."""
    return {"prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)}}


def function_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call as OpenAI's chat completions show it."""
    return {"id": call["id"], "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


def headers(request_id: str, served: Served) -> dict[str, str]:
    """Response headers naming the request and where it ran."""
    return {"x-request-id": request_id, "x-mlx-stack-node": served.node_id,
            "x-mlx-stack-worker": served.worker_id}


async def collect(events: AsyncIterator[JobEvent]) -> Whole:
    """A job's pieces joined: the whole text, tool calls, log-probabilities, the end."""
    parts: list[str] = []
    calls: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] = []
    async for event in events:
        if isinstance(event, Piece):
            parts.append(event.text)
            calls += event.tool_calls
            logprobs += event.logprobs
        elif isinstance(event, Done):
            return Whole("".join(parts), calls, logprobs, event)
    raise JobError(msgs.ErrorCode.INTERNAL, "the job ended without a final message")


compact = json.JSONEncoder(separators=(",", ":")).encode
"""JSON without spaces, from one encoder: ``json.dumps`` with any option builds a new
encoder per call, and every streamed token is a call."""


class TypedEvents(Protocol):
    """A shape whose stream is typed events (the Responses API, Anthropic's Messages):
    what opens it, one piece of output, the end, and a failure after the headers."""

    def start(self) -> bytes: ...

    def piece(self, piece: Piece) -> bytes: ...

    def finish(self, done: Done) -> bytes: ...

    def failed(self, code: str, message: str) -> bytes: ...


async def typed_events(job: AsyncIterator[JobEvent], shape: TypedEvents
                       ) -> AsyncIterator[bytes]:
    """The event stream of a streamed answer in ``shape``; a late failure is the shape's
    failure event (the headers are sent: an event is all that is left)."""
    yield shape.start()
    try:
        async for event in job:
            if isinstance(event, Piece):
                if out := shape.piece(event):
                    yield out
            elif isinstance(event, Done):
                yield shape.finish(event)
    except JobError as exc:
        yield shape.failed(exc.code, exc.message)
    except Exception as exc:
        log_event(log, "stream_failed", logging.ERROR, error=repr(exc))
        yield shape.failed(msgs.ErrorCode.INTERNAL, "internal error while streaming; see the "
                           "gateway log")


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + compact(obj).encode() + b"\n\n"


async def sse(events: AsyncIterator[JobEvent], shape: Completion) -> AsyncIterator[bytes]:
    """SSE events of a streamed completion; a late failure becomes an error event.

    Events are yielded as encoded bytes (sse-starlette passes bytes through untouched),
    and the last chunk, the usage chunk and ``[DONE]`` leave in one write.
    """
    if shape.chat:
        yield _data(shape.chunk("", role=True))
    try:
        async for event in events:
            if isinstance(event, Piece) and (event.text or event.tool_calls or event.logprobs):
                yield _data(shape.chunk(event.text or None, tool_calls=event.tool_calls,
                                        logprobs=event.logprobs))
            elif isinstance(event, Done):
                last = _data(shape.chunk(None if shape.chat else "", event.finish_reason))
                if shape.include_usage:
                    last += _data(shape.usage_chunk(event.usage))
                yield last + DONE
    except JobError as exc:
        yield _data(errors.job_error_body(exc)[1])
    except Exception as exc:  # the headers are sent: an error event is all that is left
        log_event(log, "stream_failed", logging.ERROR, error=repr(exc))
        yield _data(errors.error_body("internal error while streaming; see the gateway log",
                                      "server_error", msgs.ErrorCode.INTERNAL))
