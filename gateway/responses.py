"""The Responses API (``POST /v1/responses``), stateless, over the same jobs as chat.

A request is translated into a chat completion request (``input`` items into messages,
``instructions`` into a system message, flat function tools into chat tools,
``text.format`` into ``response_format``) and validated by the same model, so both APIs
accept and refuse the same things. The answer is a Response object, or its typed event
stream: ``response.created`` ... ``response.completed``, each event numbered, as the
``openai`` SDK and the OpenAI Agents SDK read them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.logs import log_event
from common.protocol import ErrorCode
from gateway.client import Done, JobError, JobEvent, Piece
from gateway.schemas import ChatCompletionRequest, Unsupported
from gateway.shaping import Whole, compact

log = logging.getLogger("gateway")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    parallel_tool_calls: bool = True

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion (raises :class:`Unsupported`)."""
        if self.previous_response_id:
            raise Unsupported("previous_response_id", "responses are not stored here; "
                              "send the whole conversation in input")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) \
            else self.input
        for index, item in enumerate(items):
            messages += _messages(item, index, messages)
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "stream": self.stream,
            "temperature": self.temperature, "top_p": self.top_p,
            "max_tokens": self.max_output_tokens,
            "parallel_tool_calls": self.parallel_tool_calls,
            "stream_options": {"include_usage": True} if self.stream else None}
        if self.tools:
            body["tools"] = [_chat_tool(t, i) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        fmt = (self.text or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "answer"), "schema": fmt.get("schema")}}
        elif isinstance(fmt, dict):
            body["response_format"] = {"type": fmt.get("type")}
        try:
            return ChatCompletionRequest.model_validate(
                {k: v for k, v in body.items() if v is not None}, strict=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise Unsupported("input", f"{first['msg']} at "
                              f"{'.'.join(map(str, first['loc']))}") from None


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content]
        if all(p.get("type") in ("input_text", "output_text", "text") for p in content) \
                and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise Unsupported(where, "content must be text (input_text or output_text parts)")


def _messages(item: dict[str, Any], index: int,
              before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for one input item (a function call joins the assistant message
    before it, as chat templates expect the calls of one turn together)."""
    kind = item.get("type", "message")
    where = f"input.{index}"
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise Unsupported(where, f"role {role!r} is not user, assistant, system or "
                              "developer")
        return [{"role": role, "content": _text(item.get("content"), where)}]
    if kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
        last = before[-1] if before else None
        if last and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(call)
            return []
        return [{"role": "assistant", "content": "", "tool_calls": [call]}]
    if kind == "function_call_output":
        output = item.get("output")
        return [{"role": "tool", "tool_call_id": item.get("call_id"),
                 "content": output if isinstance(output, str) else json.dumps(output)}]
    raise Unsupported(where, f"input items of type {kind!r} are not supported; send "
                      "message, function_call or function_call_output items")


def _chat_tool(tool: dict[str, Any], index: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise Unsupported(f"tools.{index}", f"tools of type {tool.get('type')!r} are not "
                          "supported; only function tools run here")
    return {"type": "function", "function": {
        k: tool[k] for k in ("name", "description", "parameters") if k in tool}}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


class Shape:
    """One Response object, and the events that build it while it streams."""

    def __init__(self, request_id: str, body: ResponsesRequest, model: str) -> None:
        self.id = f"resp_{request_id}"
        self.created_at = int(time.time())
        self.body = body
        self.model = model
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.text: list[str] | None = None
        """The message being written, while one is open."""

    def response(self, status: str, done: Done | None = None) -> dict[str, Any]:
        usage = None
        if done is not None:
            usage = {"input_tokens": done.usage.get("prompt_tokens", 0),
                     "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": done.usage.get("completion_tokens", 0),
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": done.usage.get("total_tokens", 0)}
        incomplete = done is not None and done.finish_reason == "length"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": "incomplete" if incomplete else status, "model": self.model,
            "output": self.output, "instructions": self.body.instructions,
            "tools": self.body.tools or [], "tool_choice": self.body.tool_choice or "auto",
            "parallel_tool_calls": self.body.parallel_tool_calls,
            "temperature": self.body.temperature, "top_p": self.body.top_p,
            "max_output_tokens": self.body.max_output_tokens,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "error": None, "metadata": {}, "usage": usage,
            "text": {"format": (self.body.text or {}).get("format", {"type": "text"})},
        }

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return (f"event: {kind}\ndata: ".encode()
                + compact(event).encode() + b"\n\n")

    def _message(self) -> dict[str, Any]:
        return {"id": f"msg_{self.id[5:]}_{len(self.output)}", "type": "message",
                "role": "assistant", "status": "in_progress", "content": []}

    def _open_text(self) -> list[bytes]:
        if self.text is not None:
            return []
        self.text = []
        item = self._message()
        self.output.append(item)
        index = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=index, item=item),
                self._event("response.content_part.added", item_id=item["id"],
                            output_index=index, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})]

    def _close_text(self) -> list[bytes]:
        if self.text is None:
            return []
        item, index = self.output[-1], len(self.output) - 1
        text, self.text = "".join(self.text), None
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item.update(status="completed", content=[part])
        return [self._event("response.output_text.done", item_id=item["id"],
                            output_index=index, content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"],
                            output_index=index, content_index=0, part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _call(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"fc_{call['id'][5:]}", "type": "function_call", "status": "completed",
                "call_id": call["id"], "name": call["name"], "arguments": call["arguments"]}

    def start(self) -> bytes:
        created = self.response("in_progress")
        return (self._event("response.created", response=created)
                + self._event("response.in_progress", response=created))

    def piece(self, piece: Piece) -> bytes:
        out: list[bytes] = []
        if piece.text:
            out += self._open_text()
            item = self.output[-1]
            assert self.text is not None
            self.text.append(piece.text)
            out.append(self._event("response.output_text.delta", item_id=item["id"],
                                   output_index=len(self.output) - 1, content_index=0,
                                   delta=piece.text, logprobs=[]))
        for call in piece.tool_calls:
            out += self._close_text()
            item = self._call(call)
            index = len(self.output)
            self.output.append(item)
            out += [self._event("response.output_item.added", output_index=index,
                                item={**item, "arguments": "", "status": "in_progress"}),
                    self._event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=index, delta=item["arguments"]),
                    self._event("response.function_call_arguments.done", item_id=item["id"],
                                output_index=index, arguments=item["arguments"],
                                name=item["name"]),
                    self._event("response.output_item.done", output_index=index, item=item)]
        return b"".join(out)

    def finish(self, done: Done) -> bytes:
        out = self._close_text()
        final = self.response("completed", done)
        kind = "response.incomplete" if final["status"] == "incomplete" \
            else "response.completed"
        return b"".join(out) + self._event(kind, response=final)

    def failed(self, code: str, message: str) -> bytes:
        failed = self.response("failed")
        failed["error"] = {"code": code, "message": message}
        return self._event("response.failed", response=failed)

    def stream(self, job: AsyncIterator[JobEvent]) -> AsyncIterator[bytes]:
        return events(job, self)

    def whole(self, answer: Whole) -> dict[str, Any]:
        """The Response object of a request that did not stream."""
        text, calls, done = answer.text, answer.tool_calls, answer.done
        if text:
            item = self._message()
            item.update(status="completed", content=[
                {"type": "output_text", "text": text, "annotations": [], "logprobs": []}])
            self.output.append(item)
        self.output += [self._call(call) for call in calls]
        return self.response("completed", done)


async def events(job: AsyncIterator[JobEvent], shape: Shape) -> AsyncIterator[bytes]:
    """The typed event stream of a streamed response; a late failure is its
    ``response.failed`` event."""
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
    except Exception as exc:  # the headers are sent: an event is all that is left
        log_event(log, "stream_failed", logging.ERROR, error=repr(exc))
        yield shape.failed(ErrorCode.INTERNAL, "internal error while streaming; see the "
                           "gateway log")
