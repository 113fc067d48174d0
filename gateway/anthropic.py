"""The Anthropic Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) over
the same jobs as chat, so that Claude Code and the Anthropic SDKs work unchanged.

A request is translated into a chat completion request and validated by the same model,
as the Responses API is (gateway/responses.py): ``system`` and text blocks into messages,
``tool_use`` blocks into an assistant message's ``tool_calls``, ``tool_result`` blocks
into ``tool`` messages, tools' ``input_schema`` into function ``parameters``,
``tool_choice`` auto/any/tool/none into chat's auto/required/named/none. The answer is a
Message object, or Anthropic's event stream: ``message_start``, ``ping``, a
``content_block_start``/``_delta``/``_stop`` run per text or ``tool_use`` block,
``message_delta`` (stop reason, usage), ``message_stop``; a late failure is an ``error``
event. Errors before the answer are in Anthropic's shape too (gateway/errors.py).

What the mesh cannot do is said, not faked: image and document blocks and server tools
are refused by name. ``thinking`` blocks a client sends back are dropped (the mesh's
models write none), and so are request fields that only steer Anthropic's own service
(``thinking``, ``cache_control``, ``context_management``, ``metadata``...);
``output_config.format`` is enforced as chat's ``response_format``. Tool call ids
are the worker's ``call_...`` shown as ``toolu_...``, and mapped back when a client
returns them.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlx_stack.gateway import errors
from mlx_stack.gateway.attempts import Done, JobEvent, Piece
from mlx_stack.gateway.schemas import ChatCompletionRequest, Unsupported
from mlx_stack.gateway.shaping import Whole, compact, typed_events

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
"""Chat's finish reasons as Anthropic's stop reasons (``stop_sequence`` when a stop
sequence ended the answer: :attr:`gateway.client.Done.stop_sequence`)."""
CHARS_PER_TOKEN = 4
"""count_tokens' estimate: the gateway has no tokenizer (the workers do), and about four
characters a token is the usual figure for English text and code."""
DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
FIELDS = {"stop": "stop_sequences", "response_format": "output_config.format"}
"""Chat's fields that a refusal may name, as the Messages API calls them."""


def field(param: str | None) -> str | None:
    """The Messages API's name for a refused chat field (:data:`FIELDS`)."""
    return FIELDS.get(param, param) if param else param


class MessagesBody(BaseModel):
    """What ``/v1/messages/count_tokens`` reads: a message request without its answer's
    settings."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, max_length=256)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None

    def to_chat(self, max_tokens: int = 1, **settings: Any) -> ChatCompletionRequest:
        """The same request as a chat completion (raises :class:`Unsupported`)."""
        messages = [{"role": "system", "content": _text(self.system, "system")}] \
            if self.system else []
        for index, message in enumerate(self.messages):
            messages += _messages(message, f"messages.{index}")
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "max_tokens": max_tokens, **settings}
        if self.tools:
            body["tools"] = [_chat_tool(t, f"tools.{i}") for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"], parallel = _chat_tool_choice(self.tool_choice)
            body["parallel_tool_calls"] = parallel
        try:
            return ChatCompletionRequest.model_validate(body, strict=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise Unsupported(str(field(str(first["loc"][0]))), first["msg"]) from None

    def estimate_tokens(self) -> int:
        """The prompt's tokens, estimated from its characters (:data:`CHARS_PER_TOKEN`):
        the texts and tool calls of every message, and the tools' definitions."""
        chat = self.to_chat()
        parts = [m.to_template(i) for i, m in enumerate(chat.messages)]
        chars = sum(len(p["content"]) + len(compact(p.get("tool_calls", []))) for p in parts)
        chars += len(compact(chat.tools or []))
        return math.ceil(chars / CHARS_PER_TOKEN)


class MessagesRequest(MessagesBody):
    max_tokens: int = Field(ge=1)
    """Required by Anthropic's API, so clients send a generous ceiling (Claude Code:
    128,000): a ceiling over the gateway's ``max_tokens_limit`` is taken as that limit,
    not refused (the answer then ends with ``stop_reason: max_tokens`` there)."""
    stop_sequences: list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    """Its ``format`` (structured outputs) is chat's ``response_format``; its ``effort``
    steers thinking, which the mesh's models do not do."""
    stream: bool = False

    def to_generate(self, max_tokens_limit: int) -> ChatCompletionRequest:
        """The chat completion to run, its ``max_tokens`` within ``max_tokens_limit``."""
        settings: dict[str, Any] = {}
        fmt = (self.output_config or {}).get("format")
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
                raise Unsupported("output_config.format", "send a format of type "
                                  "'json_schema' with its schema")
            settings["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": fmt.get("schema")}}
        return self.to_chat(
            min(self.max_tokens, max_tokens_limit), stream=self.stream,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            stop=self.stop_sequences or None, **settings)


def _text(content: Any, where: str) -> str:
    """Text given as a string or as text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind != "text" or not isinstance(block.get("text"), str):
                raise Unsupported(f"{where}.{index}", "send text blocks here, "
                                  '{"type": "text", "text": "..."}' + (
                                      f"; blocks of type {kind!r} are not supported"
                                      if kind != "text" else ""))
            texts.append(block["text"])
        return "".join(texts)
    raise Unsupported(where, "send a string or a list of text blocks")


def call_id(tool_use_id: Any) -> Any:
    """A client's ``tool_use`` id as the worker's call id (``toolu_X`` -> ``call_X``)."""
    if isinstance(tool_use_id, str) and tool_use_id.startswith("toolu_"):
        return "call_" + tool_use_id[6:]
    return tool_use_id


def tool_use_id(call: str) -> str:
    """A worker's call id as a ``tool_use`` id (``call_X`` -> ``toolu_X``)."""
    return "toolu_" + call[5:] if call.startswith("call_") else call


def _messages(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Chat messages for one Anthropic message: its blocks in order, text blocks in a
    row joined, each ``tool_result`` a ``tool`` message, ``tool_use`` blocks the
    assistant message's calls."""
    role = message.get("role")
    if role not in ("user", "assistant", "system"):  # Claude Code sends system ones too
        raise Unsupported(f"{where}.role", f"role {role!r} is not user or assistant")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise Unsupported(f"{where}.content", "send a string or a list of content blocks")
    out: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        at = f"{where}.content.{index}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in DROPPED_BLOCKS:
            continue
        if kind == "text" and isinstance(block.get("text"), str):
            if out and out[-1]["role"] == role and "tool_calls" not in out[-1]:
                out[-1]["content"] += block["text"]
            else:
                out.append({"role": role, "content": block["text"]})
        elif kind == "tool_use" and role == "assistant":
            if not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
                    and isinstance(block.get("input", {}), dict)):
                raise Unsupported(at, "a tool_use block needs an id and a name (strings) "
                                  "and an input object")
            calls.append({"id": call_id(block.get("id")), "type": "function", "function": {
                "name": block.get("name"), "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result" and role == "user":
            text = _text(block.get("content", ""), f"{at}.content")
            out.append({"role": "tool", "tool_call_id": call_id(block.get("tool_use_id")),
                        "content": f"Error: {text}" if block.get("is_error") else text})
        else:
            raise Unsupported(at, f"content blocks of type {kind!r} are not supported in a "
                              f"{role} message; send text, tool_use (assistant) or "
                              "tool_result (user) blocks")
    if calls:  # chat templates expect one turn's calls on one assistant message
        if out and out[-1]["role"] == "assistant":
            out[-1]["tool_calls"] = calls
        else:
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
    return out


def _chat_tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    if tool.get("type", "custom") != "custom":
        raise Unsupported(where, f"tool {tool.get('name')!r} of type {tool.get('type')!r} "
                          "is not supported; only client tools (name, input_schema) run "
                          "here")
    if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
        raise Unsupported(where, "a tool needs a name (a string) and an input_schema (a "
                          "JSON schema object)")
    function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
    if "description" in tool:
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: dict[str, Any]) -> tuple[str | dict[str, Any], bool]:
    """Chat's ``tool_choice`` and ``parallel_tool_calls`` for Anthropic's ``tool_choice``."""
    kind = choice.get("type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}, parallel
    names = {"auto": "auto", "any": "required", "none": "none"}
    if kind not in names:
        raise Unsupported("tool_choice", f"tool_choice type {kind!r} is not one of 'auto', "
                          "'any', 'tool' or 'none'")
    return names[kind], parallel


def error_event(status: int, message: str) -> bytes:
    """An ``error`` event: how a stream whose headers are sent reports a failure."""
    return _event("error", errors.anthropic_body(status, message))


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: ".encode() + compact(data).encode() + b"\n\n"


class Shape:
    """One Message object, and the events that build it while it streams."""

    def __init__(self, request_id: str, model: str) -> None:
        self.id = f"msg_{request_id}"
        self.model = model
        self.blocks = 0
        """Content blocks started so far: the next one's index."""
        self.text_open = False

    def message(self, content: list[dict[str, Any]], done: Done | None) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason(done) if done else None,
                "stop_sequence": (done.stop_sequence or None) if done else None,
                "usage": usage(done)}

    def start(self) -> bytes:
        return (_event("message_start", {"type": "message_start",
                                         "message": self.message([], None)})
                + _event("ping", {"type": "ping"}))

    def _open(self, block: dict[str, Any]) -> bytes:
        self.blocks += 1
        return _event("content_block_start", {"type": "content_block_start",
                                              "index": self.blocks - 1,
                                              "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta",
                                              "index": self.blocks - 1, "delta": delta})

    def _close(self) -> bytes:
        return _event("content_block_stop", {"type": "content_block_stop",
                                             "index": self.blocks - 1})

    def _close_text(self) -> bytes:
        if not self.text_open:
            return b""
        self.text_open = False
        return self._close()

    def piece(self, piece: Piece) -> bytes:
        out = b""
        if piece.text:
            if not self.text_open:
                self.text_open = True
                out += self._open({"type": "text", "text": ""})
            out += self._delta({"type": "text_delta", "text": piece.text})
        for call in piece.tool_calls:
            out += self._close_text()
            out += self._open({"type": "tool_use", "id": tool_use_id(call["id"]),
                               "name": call["name"], "input": {}})
            out += self._delta({"type": "input_json_delta", "partial_json": call["arguments"]})
            out += self._close()
        return out

    def finish(self, done: Done) -> bytes:
        return (self._close_text()
                + _event("message_delta", {
                    "type": "message_delta", "usage": usage(done),
                    "delta": {"stop_reason": stop_reason(done),
                              "stop_sequence": done.stop_sequence or None}})
                + _event("message_stop", {"type": "message_stop"}))

    def failed(self, code: str, message: str) -> bytes:
        """The ``error`` event of a failure after the headers went out."""
        return error_event(errors.STATUS.get(code, (500, ""))[0], message)

    def stream(self, job: AsyncIterator[JobEvent]) -> AsyncIterator[bytes]:
        return typed_events(job, self)

    def whole(self, answer: Whole) -> dict[str, Any]:
        """The Message object of a request that did not stream."""
        content: list[dict[str, Any]] = [{"type": "text", "text": answer.text}] \
            if answer.text else []
        content += [{"type": "tool_use", "id": tool_use_id(call["id"]), "name": call["name"],
                     "input": _input(call["arguments"])} for call in answer.tool_calls]
        return self.message(content, answer.done)


def _input(arguments: str) -> Any:
    """A call's arguments as ``tool_use`` input; a call cut short by ``max_tokens`` may
    hold partial JSON, which is no input at all (the stop reason says why)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return {}


def stop_reason(done: Done) -> str:
    if done.finish_reason == "stop" and done.stop_sequence:
        return "stop_sequence"
    return STOP_REASONS.get(done.finish_reason, "end_turn")


def usage(done: Done | None) -> dict[str, int]:
    """Anthropic's usage. As Anthropic counts, ``input_tokens`` are the prompt tokens not
    read from the cache and ``cache_read_input_tokens`` those the worker's prompt cache
    served; nothing is written to a cache on request (the worker keeps every ended
    sequence's), so ``cache_creation_input_tokens`` is 0."""
    counts = done.usage if done else {}
    prompt = counts.get("prompt_tokens", 0)
    cached = min(counts.get("cached_tokens", 0), prompt)
    return {"input_tokens": prompt - cached,
            "output_tokens": counts.get("completion_tokens", 0),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}

