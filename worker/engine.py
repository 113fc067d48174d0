"""What a worker needs from an inference engine, and nothing more.

An engine runs a batch of sequences: :meth:`Engine.insert` adds one (it joins the batch at
once, continuous batching), :meth:`Engine.step` advances every running sequence by at most
one token, :meth:`Engine.remove` drops one. One thread, the worker's batch loop
(:mod:`worker.batch`), makes every call, so an engine needs no locks. Stop sequences,
resuming a stream that another worker began, usage and cancellation are the same for
every engine and live in :mod:`worker.runner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from mlx_stack.common.generation import GenerationRequest
from mlx_stack.worker.tools import ToolFormat


class Detokenizer(Protocol):
    """mlx-lm's streaming detokenizer interface: ``text`` grows as tokens are added, and
    may lag behind them (held-back bytes of an unfinished character or word)."""

    text: str

    def add_token(self, token: int) -> None: ...

    def finalize(self) -> None: ...


class RequestRefused(ValueError):
    """The engine cannot honour what the request asks (``param`` names the field): the
    client gets a 400 naming it, not an engine error and not an answer that ignores it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Step:
    """One sequence's share of an engine step."""

    seq: int
    token: int | None
    """The new token; None when the sequence ended at an end-of-sequence token (which is
    never output)."""
    done: bool
    """The engine has dropped the sequence: end of sequence, or its ``max_tokens`` reached
    (then ``token`` is the last one)."""
    logprob: dict[str, Any] | None = None
    """The token's log-probability in OpenAI's shape, when the request asked for it."""


class Engine(Protocol):
    kind: str
    """"mlx" for real inference; "synthetic" for the routing/load-test engine."""
    model_id: str
    slots: int
    """How many sequences may run at once (the slots the broker fills)."""
    model_bytes: int
    kv_bytes: int
    """KV cache memory in use (running sequences and the prompt cache), for load reports."""
    counters: dict[str, int]
    """The engine's own counters (prompt cache hits...), sent with every heartbeat."""
    tool_format: ToolFormat | None
    """How the model writes a tool call; None when its chat template has no tools."""
    context_length: int
    """Tokens the model attends to, prompt and answer together: no answer runs past it."""

    @property
    def cache_entries(self) -> int:
        """Entries the prompt cache holds now (read by the I/O thread for heartbeats)."""
        ...

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids (chat template applied for chat requests)."""
        ...

    def detokenizer(self, request: GenerationRequest) -> Detokenizer:
        """A fresh streaming detokenizer for ``request``'s output."""
        ...

    def insert(self, prompt: list[int], request: GenerationRequest, max_tokens: int,
               prompt_len: int) -> int:
        """Start generating after ``prompt`` (at most ``max_tokens``, > 0, with the
        request's sampling and constraints); returns the sequence's id. The first
        ``prompt_len`` tokens are the request's own prompt, the rest were generated before
        (a resumed stream). Raises :class:`RequestRefused` for what it cannot honour."""
        ...

    def remove(self, seq: int) -> None:
        """Drop a running sequence now (a stop sequence, a cancellation): its slot is free
        for the next step. Unknown ids are ignored."""
        ...

    def step(self) -> list[Step]:
        """Advance the batch: at most one token for each running sequence (none for one
        still in prefill)."""
        ...

    def wait(self) -> float | None:
        """Seconds until :meth:`step` has work (0: now); None when no sequence runs."""
        ...
