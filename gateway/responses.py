"""The Responses API's answers (``POST /v1/responses``): a Response object, or its typed
event stream, ``response.created`` ... ``response.completed``, each event numbered, as the
``openai`` SDK, the OpenAI Agents SDK and Codex CLI read them. The request's translation
into a chat job is ``gateway.responses_request``.

A call becomes the output item of the tool it is for: ``function_call`` (with its
``namespace`` if it has one), ``custom_tool_call`` (``input``) or ``local_shell_call``
(an ``exec`` action). An answer stopped by its token limit is ``incomplete``, and so is
its last item: the message or the call it cut short. A call's item is therefore done
only when what follows it is known (more output, or the end).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from mlx_stack.gateway.attempts import Done, JobEvent, Piece
from mlx_stack.gateway.responses_request import (
    CUSTOM_INPUT,
    ClientTool,
    ResponsesRequest,
    client_tool,
)
from mlx_stack.gateway.shaping import Whole, compact, typed_events

STREAMED_FIELD = {"function_call": ("response.function_call_arguments", "arguments"),
                  "custom_tool_call": ("response.custom_tool_call_input", "input")}
"""Call items whose content streams: the prefix of their events and the field."""


class Shape:
    """One Response object, and the events that build it while it streams."""

    def __init__(self, request_id: str, body: ResponsesRequest, model: str,
                 tools: dict[str, ClientTool] | None = None) -> None:
        self.id = f"resp_{request_id}"
        self.created_at = int(time.time())
        self.body = body
        self.model = model
        self.tools = tools or {}
        """The client's tools by the name the model saw (``Translation.tools``)."""
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.text: list[str] | None = None
        """The message being written, while one is open."""
        self.open_call = False
        """Whether the last item is a call whose done events are still to come."""

    def response(self, status: str, done: Done | None = None) -> dict[str, Any]:
        usage = None
        if done is not None:
            usage = {"input_tokens": done.usage.get("prompt_tokens", 0),
                     "input_tokens_details": {
                         "cached_tokens": done.usage.get("cached_tokens", 0)},
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

    def _message(self, text: str | None = None, status: str = "in_progress") -> dict[str, Any]:
        content = [] if text is None else [_text_part(text)]
        return {"id": f"msg_{self.id[5:]}_{len(self.output)}", "type": "message",
                "role": "assistant", "status": status, "content": content}

    def _item(self, call: dict[str, Any], status: str) -> dict[str, Any]:
        """The output item of a call, by the kind of tool it is for."""
        tool = client_tool(self.tools, call["name"])
        ids = {"id": f"{ITEM_PREFIX[tool.kind]}_{call['id'][5:]}", "call_id": call["id"],
               "status": status}
        if tool.kind == "custom":
            return {"type": "custom_tool_call", **ids, "name": tool.name,
                    "input": _custom_input(call["arguments"])}
        if tool.kind == "local_shell":
            return {"type": "local_shell_call", **ids, "action": _exec(call["arguments"])}
        item = {"type": "function_call", **ids, "name": tool.name,
                "arguments": call["arguments"]}
        return {**item, "namespace": tool.namespace} if tool.namespace else item

    def _open_text(self) -> list[bytes]:
        if self.text is not None:
            return []
        out = self._close("completed")
        self.text = []
        item = self._message()
        self.output.append(item)
        index = len(self.output) - 1
        return [*out,
                self._event("response.output_item.added", output_index=index, item=item),
                self._event("response.content_part.added", item_id=item["id"],
                            output_index=index, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})]

    def _open_call(self, call: dict[str, Any]) -> list[bytes]:
        """A call's item added and its content sent; done by :meth:`_close`."""
        out = self._close("completed")
        item = self._item(call, "in_progress")
        index = len(self.output)
        self.output.append(item)
        self.open_call = True
        streamed = STREAMED_FIELD.get(item["type"])
        out.append(self._event("response.output_item.added", output_index=index,
                               item={**item, streamed[1]: ""} if streamed else item))
        if streamed:
            out.append(self._event(f"{streamed[0]}.delta", item_id=item["id"],
                                   output_index=index, delta=item[streamed[1]]))
        return out

    def _close(self, status: str) -> list[bytes]:
        """The done events of the open item (a message or a call), if there is one."""
        item, index = (self.output[-1], len(self.output) - 1) if self.output else ({}, -1)
        if self.text is not None:
            text, self.text = "".join(self.text), None
            part = _text_part(text)
            item.update(status=status, content=[part])
            return [self._event("response.output_text.done", item_id=item["id"],
                                output_index=index, content_index=0, text=text, logprobs=[]),
                    self._event("response.content_part.done", item_id=item["id"],
                                output_index=index, content_index=0, part=part),
                    self._event("response.output_item.done", output_index=index, item=item)]
        if not self.open_call:
            return []
        self.open_call = False
        item["status"] = status
        out = []
        if streamed := STREAMED_FIELD.get(item["type"]):
            name = {"name": item["name"]} if item["type"] == "function_call" else {}
            out.append(self._event(f"{streamed[0]}.done", item_id=item["id"],
                                   output_index=index, **{streamed[1]: item[streamed[1]]},
                                   **name))
        return [*out, self._event("response.output_item.done", output_index=index,
                                  item=item)]

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
            out += self._open_call(call)
        return b"".join(out)

    def finish(self, done: Done) -> bytes:
        out = self._close("incomplete" if done.finish_reason == "length" else "completed")
        final = self.response("completed", done)
        kind = "response.incomplete" if final["status"] == "incomplete" \
            else "response.completed"
        return b"".join(out) + self._event(kind, response=final)

    def failed(self, code: str, message: str) -> bytes:
        failed = self.response("failed")
        failed["error"] = {"code": code, "message": message}
        return self._event("response.failed", response=failed)

    def stream(self, job: AsyncIterator[JobEvent]) -> AsyncIterator[bytes]:
        return typed_events(job, self)

    def whole(self, answer: Whole) -> dict[str, Any]:
        """The Response object of a request that did not stream."""
        if answer.text:
            self.output.append(self._message(answer.text, "completed"))
        self.output += [self._item(call, "completed") for call in answer.tool_calls]
        if self.output and answer.done.finish_reason == "length":
            self.output[-1]["status"] = "incomplete"
        return self.response("completed", answer.done)


ITEM_PREFIX = {"function": "fc", "custom": "ctc", "local_shell": "lsh"}
"""The id prefix of each kind of call item (OpenAI's)."""


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _json_object(arguments: str) -> dict[str, Any]:
    """A call's arguments as an object ({} when cut short or not JSON)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _custom_input(arguments: str) -> str:
    """A custom tool's free-text input: the model wrote it as the one string argument;
    arguments that are not that object are the input as they are."""
    value = _json_object(arguments).get(CUSTOM_INPUT)
    return value if isinstance(value, str) else arguments


def _exec(arguments: str) -> dict[str, Any]:
    """A ``local_shell`` call's arguments as the ``exec`` action of a local_shell_call."""
    args = _json_object(arguments)
    command = args.get("command")
    if isinstance(command, str):
        command = [command]
    return {"type": "exec",
            "command": [str(c) for c in command] if isinstance(command, list) else [],
            "timeout_ms": args.get("timeout_ms"), "working_directory": args.get("workdir"),
            "env": {}, "user": None}

