"""A JSON schema enforced while sampling: an mlx-lm logits processor over llguidance.

Each step, the matcher says which tokens may come next and every other token's logit is
set to -inf, so the sampler can only pick text that still matches the schema; once the
JSON is complete only the end of sequence is allowed. llguidance's own MLX helper needs
Metal, so the mask is applied here with ``mx.where`` (about 2 ms a step on two CPU cores,
against ~75 ms for the model's step).

mlx-lm calls a processor with the whole context (prompt, then every token sampled so far,
also the part served from the prompt cache). The processor feeds the matcher what follows
the request's own prompt, so a job resumed after a failover, whose prompt ends with the
tokens already sent, starts from the grammar state those tokens reached.
"""

from __future__ import annotations

from pathlib import Path

import llguidance
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask


def ll_tokenizer(model_dir: Path, eos_token_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the model's vocabulary, from its ``tokenizer.json``."""
    text = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    return llguidance.LLTokenizer(text, eos_token=list(eos_token_ids))


class GrammarProcessor:
    """``(tokens, logits) -> logits`` allowing only tokens the grammar accepts next.

    ``prompt_len`` is the length of the request's own prompt: tokens after it were
    generated (here, or before a failover elsewhere). A processor never raises: an
    exception inside mlx-lm's batch step would fail every job of the batch. When the
    matcher cannot go on it allows only the end of sequence, and says why in ``error``."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str,
                 prompt_len: int) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.eos = tokenizer.eos_token
        self.prompt_len = prompt_len
        self.consumed = 0
        self.bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)
        self.error = self.matcher.get_error() if self.matcher.is_error() else ""

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        start = self.prompt_len + self.consumed
        if tokens.size > start:
            self._consume(tokens[start:].tolist())
        if self.error:
            allowed = np.zeros(logits.shape[-1], dtype=np.bool_)
            allowed[self.eos] = True
        else:
            fill_next_token_bitmask(self.matcher, self.bitmask)
            bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")
            allowed = np.zeros(logits.shape[-1], dtype=np.bool_)
            n = min(bits.size, allowed.size)  # the model may pad its vocabulary
            allowed[:n] = bits[:n]
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))

    def _consume(self, ids: list[int]) -> None:
        self.consumed += len(ids)
        # mlx-lm's loop runs one step ahead: it calls once more with the end of sequence
        # it sampled after the JSON was complete. A stopped matcher takes nothing more.
        if self.error or self.matcher.is_stopped():
            return
        if not self.matcher.consume_tokens(ids):
            self.error = self.matcher.get_error() or "the grammar refused a token"
