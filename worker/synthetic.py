"""The SYNTHETIC engine: deterministic tokens at a set rate, for routing and load tests.

It never runs a model. Token n of a sequence depends only on the token before it and
the sequence length, so a stream resumed on another synthetic worker continues exactly
where it stopped, and a test can compute the expected stream with :func:`next_token`.
Named "synthetic" in READY, logs, ``/v1/models`` and ``mesh`` output; never the default.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from common.protocol import GenerationRequest

VOCAB = 50_000
BYTE_TOKENS = 256
FAULT = "[[synthetic-engine-error]]"
"""A prompt containing this makes the synthetic engine raise: the fault switch for tests
of how engine errors reach the client."""


def next_token(sequence: list[int]) -> int:
    """The synthetic engine's next token after ``sequence`` (prompt + generated)."""
    last = sequence[-1] if sequence else 0
    return BYTE_TOKENS + (last * 7919 + len(sequence) * 104_729) % VOCAB


def word(token: int) -> str:
    """The text of a synthetic token: one word."""
    return f" w{token}"


class SyntheticDetokenizer:
    def __init__(self) -> None:
        self.text = ""

    def add_token(self, token: int) -> None:
        self.text += word(token)

    def finalize(self) -> None:
        pass


class SyntheticEngine:
    """Emits ``rate`` tokens per second per job after ``ttft`` seconds, in ``slots`` seats."""

    kind = "synthetic"
    model_bytes = 0

    def __init__(self, model_id: str, slots: int = 4, rate: float = 200.0,
                 ttft: float = 0.0) -> None:
        self.model_id = model_id
        self.slots = slots
        self.rate = rate
        self.ttft = ttft

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        text = request.prompt if request.kind == "completion" else "\n".join(
            str(m.get("content", "")) for m in request.messages)
        return list(text.encode("utf-8"))

    def detokenizer(self) -> SyntheticDetokenizer:
        return SyntheticDetokenizer()

    def generate(self, prompt: list[int], request: GenerationRequest,
                 max_tokens: int) -> Iterator[int]:
        if FAULT.encode() in bytes(t for t in prompt if t < BYTE_TOKENS):
            raise RuntimeError("synthetic engine error (fault switch in the prompt)")
        sequence = list(prompt)
        due = time.monotonic() + self.ttft
        for _ in range(max_tokens):
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            token = next_token(sequence)
            sequence.append(token)
            yield token
            due += 1.0 / self.rate if self.rate > 0 else 0.0
