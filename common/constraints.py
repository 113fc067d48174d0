"""Structured output: what a request's ``response_format`` asks, as a grammar.

The gateway compiles a request's JSON schema before anything runs, so that a schema the
grammar library cannot honour is a 400 that says why, never an answer that ignores the
format. The worker compiles the same schema into the grammar its logits processor
enforces (worker/grammar.py). The schema, not the grammar, travels in the job: both sides
build the grammar with this one function.

The library is llguidance: one dependency-free wheel (no torch), a full JSON-schema
compiler (``$ref``, ``anyOf``, recursion, formats) that builds lazily in about a
millisecond, and a matcher that replays a list of tokens, which is how a stream resumed on
another worker after a failover gets its grammar state back. xgrammar needs torch;
outlines-core takes seconds to index ``{"type": "object"}`` and ignores keywords it does
not know.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

ANY_OBJECT: dict[str, Any] = {"type": "object"}
"""What ``response_format: {"type": "json_object"}`` asks for."""


class SchemaError(ValueError):
    """A JSON schema the grammar library cannot compile; the message says why."""


def json_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of JSON text that matches ``schema``.

    Whitespace is fixed (compact JSON): a small model given the freedom of flexible
    whitespace can spend its whole budget on newlines."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False})
    except ValueError as exc:
        raise SchemaError(str(exc)) from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise SchemaError("; ".join(messages))
    return grammar


def tool_call_grammar(start: str, end: str, tools: list[dict[str, Any]],
                      name: str = "") -> str:
    """The grammar of one tool call written as ``start {"name": ..., "arguments": {...}}
    end`` (the JSON-bodied families, such as Qwen's and Hermes' ``<tool_call>``), for
    ``tool_choice`` required (any of ``tools``) or naming one function (``name``)."""
    options = []
    for tool in tools:
        function = tool.get("function", tool)
        if name and function.get("name") != name:
            continue
        options.append({"type": "object", "additionalProperties": False,
                        "required": ["name", "arguments"],
                        "properties": {"name": {"const": function.get("name")},
                                       "arguments": function.get("parameters")
                                       or {"type": "object"}}})
    if not options:
        raise SchemaError(f"no tool named {name!r} among the request's tools")
    body = options[0] if len(options) == 1 else {"anyOf": options}
    lark = (f"start: {json.dumps(start + chr(10))} call {json.dumps(chr(10) + end)}\n"
            f"call: %json {json.dumps(body)}\n")
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise SchemaError("; ".join(messages))
    return grammar
