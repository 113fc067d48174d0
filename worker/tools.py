"""Tool calls in a model's output: the text between its family's markers, parsed by
mlx-lm's own parser for that family (``mlx_lm/tool_parsers/``).

The worker parses, because the worker has the tokens: a stream resumed on another worker
replays the tokens already sent through the same scanner, so the calls the client has
received are known and never sent twice, and the next call gets the next index.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Parse = Callable[[str, Any], Any]
"""mlx-lm's ``parse_tool_call(text, tools)``: a dict ``{"name", "arguments"}`` or a list."""


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How one model family writes a tool call."""

    start: str
    end: str
    """"" when a call runs to the end of the output (mistral)."""
    parse: Parse


class ToolScanner:
    """Splits the growing output text into content and tool calls.

    :meth:`feed` takes the whole text so far and returns the content not yet returned
    (holding back what may be the start of a marker) and the calls completed since."""

    def __init__(self, fmt: ToolFormat, tools: Any) -> None:
        self.fmt = fmt
        self.tools = tools
        self.pos = 0
        """How far the text has been scanned."""
        self.body: int | None = None
        """Where the call being written began (None outside a call)."""
        self.calls = 0
        """Calls found so far: the next one's index."""

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        start, end = self.fmt.start, self.fmt.end
        while True:
            if self.body is not None:
                stop = text.find(end, self.pos) if end else -1
                if stop < 0 and not final:
                    self.pos = max(self.body, len(text) - len(end) + 1)
                    break
                cut = stop < 0 and bool(end)  # the output ended inside the call
                stop = len(text) if stop < 0 else stop
                parsed = self._parsed(text[self.body:stop])
                if not parsed and cut:
                    parsed = self._cut_short(text[self.body:stop])
                calls += parsed
                if not parsed and not cut:  # not a call after all: the text as it is
                    content.append(text[self.body - len(start):stop + len(end)])
                self.pos, self.body = min(len(text), stop + len(end)), None
                if stop >= len(text):
                    break
                continue
            found = text.find(start, self.pos)
            if found < 0:
                keep = len(text) if final else len(text) - _partial_marker(text, start)
                content.append(text[self.pos:max(keep, self.pos)])
                self.pos = max(keep, self.pos)
                break
            content.append(text[self.pos:found])
            self.pos = self.body = found + len(start)
        return "".join(content), calls

    def _cut_short(self, body: str) -> list[dict[str, Any]]:
        """A call the output ended inside (its ``max_tokens`` ran out): its name and the
        arguments written so far, as OpenAI sends a call cut short, never as markup in the
        content. Without even a name there is no call to show, and nothing is sent."""
        name = _NAME.search(body)
        if name is None:
            return []
        arguments = _ARGUMENTS.search(body, name.end()) or _ARGUMENTS.search(body)
        call = {"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}",
                "name": name.group(1),
                "arguments": body[arguments.end():].strip() if arguments else ""}
        self.calls += 1
        return [call]

    def _parsed(self, body: str) -> list[dict[str, Any]]:
        try:
            parsed = self.fmt.parse(body, self.tools)
        except (ValueError, KeyError, TypeError):  # json.JSONDecodeError is a ValueError
            parsed = None
        found = parsed if isinstance(parsed, list) else [parsed] if parsed else []
        out = []
        for call in found:
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
                continue
            arguments = call.get("arguments", {})
            out.append({"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}",
                        "name": call["name"],
                        "arguments": arguments if isinstance(arguments, str)
                        else json.dumps(arguments)})
            self.calls += 1
        return out


_NAME = re.compile(r'"name"\s*:\s*"([^"\\]+)"')
_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (to hold back)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def family(name: str) -> ToolFormat:
    """The tool-call format of mlx-lm's parser ``name`` (a module of
    ``mlx_lm.tool_parsers``: json_tools, mistral, pythonic...)."""
    import importlib

    try:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    except ModuleNotFoundError:
        raise ValueError(f"mlx-lm has no tool parser {name!r}") from None
    return ToolFormat(module.tool_call_start, module.tool_call_end or "",
                      module.parse_tool_call)


def of_tokenizer(tokenizer: Any) -> ToolFormat | None:
    """The format mlx-lm found for a loaded model (from ``tool_parser_type`` in its
    tokenizer_config.json, or guessed from its chat template); None without one."""
    if not getattr(tokenizer, "has_tool_calling", False):
        return None
    return ToolFormat(tokenizer.tool_call_start, tokenizer.tool_call_end or "",
                      tokenizer.tool_parser)
