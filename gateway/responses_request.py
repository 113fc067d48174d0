"""A Responses API request (``POST /v1/responses``) as a chat completion request.

``input`` items become messages, ``instructions`` a system message, ``text.format`` a
``response_format``, and every tool the client runs becomes a chat function tool, so that
both APIs accept and refuse the same things. What the client gets back is shaped by
``gateway.responses`` with the :class:`ClientTool` map made here.

Tools, by ``type``:

- ``function``: as it is.
- ``namespace`` (Codex's ``multi_agent_v1``, MCP servers): its inner function tools,
  each under its own name, or ``<namespace>.<name>`` when that name is taken; a call
  comes back as a ``function_call`` item with ``name`` and ``namespace`` apart.
- ``custom`` (free text input, e.g. Codex's ``apply_patch``): a function with one string
  argument ``input``; a grammar ``format`` is shown to the model in the description, not
  enforced. A call comes back as a ``custom_tool_call`` item with ``input``.
- ``local_shell``: a function ``local_shell`` taking ``command`` (argv), ``workdir`` and
  ``timeout_ms``; a call comes back as a ``local_shell_call`` item with an ``exec`` action.
- hosted tools (:data:`HOSTED`): the mesh cannot run them, so they are left out of the
  prompt; the response names them in the ``x-mlx-stack-tools-ignored`` header.

Input items: ``message``, the calls above and their outputs are translated; items that
record work of hosted tools or of the model's hidden reasoning (:data:`SKIPPED`) carry
nothing a model here can read, and are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlx_stack.gateway.schemas import ChatCompletionRequest, Unsupported

HOSTED = ("web_search", "web_search_preview", "web_search_preview_2025_03_11",
          "web_search_2025_08_26", "file_search", "code_interpreter", "image_generation",
          "computer_use_preview", "computer_use", "mcp")
"""Tool types OpenAI's servers run themselves: left out of the prompt here."""
SKIPPED = ("reasoning", "compaction", "compaction_summary", "web_search_call",
           "file_search_call", "code_interpreter_call", "image_generation_call",
           "computer_call", "computer_call_output", "mcp_list_tools", "mcp_call",
           "mcp_approval_request", "mcp_approval_response")
"""Input item types skipped: reasoning (encrypted for OpenAI's models, or a summary of
it), a compacted history (encrypted), and the records of hosted tools' work."""
CALL_OUTPUTS = ("function_call_output", "custom_tool_call_output", "local_shell_call_output")
IGNORED_HEADER = "x-mlx-stack-tools-ignored"
LOCAL_SHELL = {"type": "object", "properties": {
    "command": {"type": "array", "items": {"type": "string"},
                "description": "The command and its arguments (argv)."},
    "workdir": {"type": "string", "description": "Working directory of the command."},
    "timeout_ms": {"type": "integer", "description": "Time limit in milliseconds."}},
    "required": ["command"], "additionalProperties": False}
CUSTOM_INPUT = "input"
"""The one argument of a custom tool as the model sees it."""


@dataclass(frozen=True, slots=True)
class ClientTool:
    """A tool the client runs, as the client named it (the model may see another name)."""

    kind: str
    """``function``, ``custom`` or ``local_shell``: the output item a call becomes."""
    name: str
    namespace: str | None = None


@dataclass(slots=True)
class Translation:
    """A Responses request as chat, and what shaping its answer needs to know."""

    chat: ChatCompletionRequest
    tools: dict[str, ClientTool] = field(default_factory=dict)
    """The client's tools by the name the model sees."""
    ignored: list[str] = field(default_factory=list)
    """Hosted tool types left out of the prompt, in request order, once each."""


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

    def to_chat(self) -> Translation:
        """The same request as a chat completion (raises :class:`Unsupported`)."""
        if self.previous_response_id:
            raise Unsupported("previous_response_id", "responses are not stored here; "
                              "send the whole conversation in input")
        tools = Tools(self.tools or [])
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) \
            else self.input
        for index, item in enumerate(items):
            messages += _messages(item, f"input.{index}", messages, tools)
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "stream": self.stream,
            "temperature": self.temperature, "top_p": self.top_p,
            "max_tokens": self.max_output_tokens,
            "parallel_tool_calls": self.parallel_tool_calls,
            "stream_options": {"include_usage": True} if self.stream else None}
        if tools.chat:
            body["tools"] = tools.chat
        if self.tool_choice is not None:
            body["tool_choice"] = tools.choice(self.tool_choice)
        fmt = (self.text or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "answer"), "schema": fmt.get("schema")}}
        elif isinstance(fmt, dict):
            body["response_format"] = {"type": fmt.get("type")}
        try:
            chat = ChatCompletionRequest.model_validate(
                {k: v for k, v in body.items() if v is not None}, strict=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise Unsupported("input", f"{first['msg']} at "
                              f"{'.'.join(map(str, first['loc']))}") from None
        return Translation(chat, tools.by_name, tools.ignored)


class Tools:
    """The request's tools: what the model is offered, and who each name really is."""

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        self.chat: list[dict[str, Any]] = []
        self.by_name: dict[str, ClientTool] = {}
        self.ignored: list[str] = []
        inner: list[tuple[str, dict[str, Any], str]] = []
        for index, tool in enumerate(tools):
            kind, where = tool.get("type"), f"tools.{index}"
            if kind in HOSTED:
                if kind not in self.ignored:
                    self.ignored.append(kind)
            elif kind == "namespace":
                namespace = tool.get("name")
                if not isinstance(namespace, str) or not isinstance(tool.get("tools"), list):
                    raise Unsupported(where, "a namespace tool needs a name and a list of "
                                      "tools")
                inner += [(namespace, t, f"{where}.tools.{i}")
                          for i, t in enumerate(tool["tools"])]
            elif kind in ("function", "custom", "local_shell"):
                name = self._name(tool, where, "local_shell" if kind == "local_shell" else None)
                self._offer(name, tool, ClientTool(kind, name))
            else:
                raise Unsupported(where, f"tools of type {kind!r} are not supported; send "
                                  "function, custom, local_shell or namespace tools (hosted "
                                  f"tools are left out: {', '.join(HOSTED)})")
        for namespace, tool, where in inner:  # after the top level: its names come first
            if tool.get("type") != "function":
                raise Unsupported(where, "a namespace holds function tools only")
            name = self._name(tool, where)
            seen = f"{namespace}.{name}" if name in self.by_name else name
            self._offer(seen, tool, ClientTool("function", name, namespace))

    @staticmethod
    def _name(tool: dict[str, Any], where: str, default: str | None = None) -> str:
        name = tool.get("name", default)
        if not isinstance(name, str) or not name:
            raise Unsupported(where, f"a {tool.get('type')} tool needs a name")
        return name

    def _offer(self, seen: str, tool: dict[str, Any], client: ClientTool) -> None:
        if seen in self.by_name:
            raise Unsupported("tools", f"two tools are named {seen!r}; give each its own name")
        self.by_name[seen] = client
        function: dict[str, Any] = {"name": seen}
        if client.kind == "function":
            function.update({k: tool[k] for k in ("description", "parameters") if k in tool})
        elif client.kind == "custom":
            function["description"] = _custom_description(tool)
            function["parameters"] = {
                "type": "object", "required": [CUSTOM_INPUT], "additionalProperties": False,
                "properties": {CUSTOM_INPUT: {"type": "string",
                                              "description": "The tool's whole input."}}}
        else:
            function["description"] = "Run a command on the user's machine."
            function["parameters"] = LOCAL_SHELL
        self.chat.append({"type": "function", "function": function})

    def seen_name(self, name: Any, namespace: Any = None) -> Any:
        """The name the model sees for the client's tool ``name`` (in ``namespace``)."""
        for seen, tool in self.by_name.items():
            if tool.name == name and tool.namespace == namespace:
                return seen
        return name

    def choice(self, choice: str | dict[str, Any]) -> str | dict[str, Any]:
        """``tool_choice`` as chat names it: a named tool by the name the model sees."""
        if not isinstance(choice, dict):
            return choice
        kind = choice.get("type")
        if kind in HOSTED:
            raise Unsupported("tool_choice", f"tool_choice {kind!r} names a hosted tool, "
                              "which the mesh cannot run; use 'auto', 'required' or one of "
                              "the request's function, custom or local_shell tools")
        name = "local_shell" if kind == "local_shell" else choice.get("name")
        if kind in ("function", "custom", "local_shell"):
            return {"type": "function",
                    "function": {"name": self.seen_name(name, choice.get("namespace"))}}
        return choice


def _custom_description(tool: dict[str, Any]) -> str:
    """A custom tool's description, with its input format spelled out for the model."""
    text = tool.get("description") or ""
    fmt = tool.get("format") or {}
    if fmt.get("type") == "grammar" and isinstance(fmt.get("definition"), str):
        text += (f"\n\nThe input must follow this {fmt.get('syntax', '')} grammar:\n"
                 f"{fmt['definition']}")
    return text + "\n\nPass the whole input as the string argument `input`."


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text", p.get("refusal")) for p in content]
        if all(p.get("type") in ("input_text", "output_text", "text", "refusal")
               for p in content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise Unsupported(where, "content must be text (input_text or output_text parts)")


def _output(output: Any) -> str:
    """A tool's output as the text of a tool message (text parts joined)."""
    if isinstance(output, str):
        return output
    try:
        return _text(output, "")
    except Unsupported:
        return json.dumps(output)


def _call(item: dict[str, Any], tools: Tools) -> dict[str, Any]:
    """An assistant's tool call (chat) for a call item of the client's history."""
    kind = item["type"]
    if kind == "function_call":
        name = tools.seen_name(item.get("name"), item.get("namespace"))
        arguments = item.get("arguments")
    elif kind == "custom_tool_call":
        name = tools.seen_name(item.get("name"), item.get("namespace"))
        arguments = json.dumps({CUSTOM_INPUT: item.get("input", "")})
    else:  # local_shell_call
        action = item.get("action") or {}
        name = tools.seen_name("local_shell")
        arguments = json.dumps({"command": action.get("command", []),
                                "workdir": action.get("working_directory"),
                                "timeout_ms": action.get("timeout_ms")})
    return {"id": item.get("call_id") or item.get("id"), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _messages(item: dict[str, Any], where: str, before: list[dict[str, Any]],
              tools: Tools) -> list[dict[str, Any]]:
    """Chat messages for one input item (a call joins the assistant message before it,
    as chat templates expect the calls of one turn together)."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise Unsupported(where, f"role {role!r} is not user, assistant, system or "
                              "developer")
        return [{"role": role, "content": _text(item.get("content"), where)}]
    if kind in ("function_call", "custom_tool_call", "local_shell_call"):
        call = _call(item, tools)
        last = before[-1] if before else None
        if last and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(call)
            return []
        return [{"role": "assistant", "content": "", "tool_calls": [call]}]
    if kind in CALL_OUTPUTS:
        return [{"role": "tool", "tool_call_id": item.get("call_id") or item.get("id"),
                 "content": _output(item.get("output"))}]
    if kind in SKIPPED:
        return []
    raise Unsupported(where, f"input items of type {kind!r} are not supported; send "
                      "message items, calls (function, custom tool, local shell) and their "
                      f"outputs (skipped: {', '.join(SKIPPED)})")


def client_tool(tools: dict[str, ClientTool], name: str) -> ClientTool:
    """The client's tool a call of ``name`` is for: by the name the model saw, or as
    ``<namespace>.<name>`` (a model may qualify an inner tool that needed no qualifying);
    a name the request never offered stays a plain function call."""
    if name in tools:
        return tools[name]
    namespace, _, inner = name.rpartition(".")
    for tool in tools.values():
        if namespace and tool.namespace == namespace and tool.name == inner:
            return tool
    return ClientTool("function", name)
