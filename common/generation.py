"""What a worker generates: one request, as the gateway hands it to the mesh.

The body of ``Job.request`` and ``Submit.request`` on the wire (common/messages.py), kept
apart from the messages because it is what the OpenAI surface (gateway/schemas.py) and
the engines (worker/) agree on, not how the roles talk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True, slots=True)
class GenerationRequest:
    """What a worker generates: the body of ``Job.request`` / ``Submit.request``.

    The gateway turns an OpenAI request into this (validated, defaults filled in), so a
    worker never parses HTTP-level JSON and every engine reads the same fields.
    """

    kind: str  # "chat" (messages) or "completion" (prompt)
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str = ""
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    """OpenAI's: "auto", "required", or ``{"type": "function", "function": {"name"}}``
    ("none" arrives as no tools)."""
    parallel_tool_calls: bool = True
    """False: the answer ends at its first tool call."""
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Sample among this many most likely tokens only (0: no such limit)."""
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    """Send each generated token's log-probability (OpenAI's ``logprobs``)."""
    top_logprobs: int = 0
    """... and this many most likely alternatives at each position."""
    json_schema: dict[str, Any] | None = None
    """The answer must be JSON matching this schema (``response_format``; json_object is
    ``{"type": "object"}``), enforced while sampling (worker/grammar.py)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict for a frame. Shallow: the values are plain data that msgpack
        only reads (``asdict`` deep-copied every message, 0.1 ms of a request's CPU)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
