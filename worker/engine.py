"""What a worker needs from an inference engine, and nothing more.

An engine turns a request into prompt token ids, samples further token ids, and gives a
streaming detokenizer. Stop sequences, resuming a stream another worker began, usage and
cancellation are the same for every engine and live in :mod:`worker.runner`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from common.protocol import GenerationRequest


class Detokenizer(Protocol):
    """mlx-lm's streaming detokenizer interface: ``text`` grows as tokens are added, and
    may lag behind them (held-back bytes of an unfinished character or word)."""

    text: str

    def add_token(self, token: int) -> None: ...

    def finalize(self) -> None: ...


class Engine(Protocol):
    kind: str
    """"mlx" for real inference; "synthetic" for the routing/load-test engine."""
    model_id: str
    slots: int
    """How many jobs may run at once."""
    model_bytes: int

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids (chat template applied for chat requests)."""
        ...

    def detokenizer(self) -> Detokenizer:
        """A fresh streaming detokenizer."""
        ...

    def generate(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int
    ) -> Iterator[int]:
        """Sampled token ids after ``prompt``, at most ``max_tokens``; ends early (without
        yielding it) at an end-of-sequence token."""
        ...
