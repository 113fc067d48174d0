"""The real engine: an mlx-lm model directory, its chat template, its sampler.

A thin layer over ``mlx_lm.load`` and ``mlx_lm.generate.generate_step``, like mlx-lm's
own server. One job at a time (``slots = 1``): mlx-lm's batch generation gets its own
change.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from common.protocol import GenerationRequest
from worker.engine import Detokenizer


class MlxEngine:
    """Serves one mlx-lm model directory."""

    kind = "mlx"
    slots = 1

    def __init__(self, path: Path, model_id: str) -> None:
        self.model_id = model_id
        self.model, self.tokenizer = load(str(path))
        self.model_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        self.eos = set(self.tokenizer.eos_token_ids)

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        if request.kind == "chat":
            text = self.tokenizer.apply_chat_template(
                request.messages, tools=request.tools, add_generation_prompt=True,
                tokenize=False,
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(request.prompt))

    def detokenizer(self) -> Detokenizer:
        return self.tokenizer.detokenizer

    def generate(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int
    ) -> Iterator[int]:
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(
            temp=request.temperature, top_p=request.top_p if request.top_p < 1.0 else 0.0
        )
        processors = make_logits_processors(
            presence_penalty=request.presence_penalty or None,
            frequency_penalty=request.frequency_penalty or None,
        )
        steps = generate_step(mx.array(prompt), self.model, max_tokens=max_tokens,
                              sampler=sampler, logits_processors=processors)
        for token, _ in steps:
            token = int(token)
            if token in self.eos:
                return
            yield token
