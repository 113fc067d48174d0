"""The real engine: an mlx-lm model directory, its chat template, continuous batching.

A thin layer over mlx-lm, like mlx-lm's own server: ``mlx_lm.load`` for the model,
``BatchGenerator`` for decoding every running request together, ``LRUPromptCache`` for
reusing the KV cache of a prefix this worker has already computed (an agent's next turn
resends its whole history; only the new tokens are prefilled).

What this adds to mlx-lm's server: sampling is per request even with a ``seed`` (each
request draws from its own PRNG key, so a seeded request runs in the batch and gives the
same tokens whatever else runs beside it; mlx-lm's server runs seeded requests alone).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llguidance
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import (
    LRUPromptCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import apply_top_k, apply_top_p, greedy_sampler, make_logits_processors

from mlx_stack.common.constraints import SchemaError, json_grammar, tool_call_grammar
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.worker.capacity import slots_for_memory
from mlx_stack.worker.engine import Detokenizer, RequestRefused, Step
from mlx_stack.worker.grammar import GrammarProcessor, ll_tokenizer
from mlx_stack.worker.tools import of_tokenizer

PREFILL_STEP = 512
"""Prompt tokens per sequence prefilled between two decode steps. mlx-lm's default (2048)
makes every running stream wait for a whole 2,048-token chunk of a newcomer's prompt."""
PROMPT_CACHE_ENTRIES = 64
"""Entries in the prompt cache; its bytes are bounded by the ``prompt_cache_bytes`` setting."""

Sampler = Callable[[mx.array], mx.array]


def kv_bytes_per_token(model: object) -> int:
    """KV cache bytes one token takes, measured by running one token through a fresh cache
    (works for any architecture mlx-lm knows, whatever its config calls the sizes)."""
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    return sum(c.nbytes // c.keys.shape[2] for c in cache
               if getattr(c, "keys", None) is not None)


def context_length(path: Path) -> int:
    """The model's context length from its config.json (``max_position_embeddings``, or
    the names other families use); 32,768 when it says none."""
    import json

    config = json.loads((path / "config.json").read_text())
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions",
                "seq_length", "model_max_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return int(config[key])
    return 32768


def make_sampler(request: GenerationRequest) -> Sampler:
    """The request's own sampler. Greedy requests share one sampler object, which lets
    the batch sample them in one call; the others draw from their own PRNG key."""
    if request.temperature == 0:
        return greedy_sampler
    key = mx.random.key(request.seed if request.seed is not None else secrets.randbits(63))
    inverse_temp, top_p, top_k = 1.0 / request.temperature, request.top_p, request.top_k

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, draw = mx.random.split(key)
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if 0 < top_k < logprobs.shape[-1]:  # mlx-lm refuses a k of the whole vocabulary
            logprobs = apply_top_k(logprobs, top_k)
        return mx.random.categorical(logprobs * inverse_temp, key=draw)

    return sample


class MlxEngine:
    """Serves one mlx-lm model directory to a batch of requests."""

    kind = "mlx"

    def __init__(self, path: Path, model_id: str, *, max_slots: int, prompt_cache_bytes: int,
                 free_memory: int) -> None:
        self.model_id = model_id
        self.path = path
        self.model, self.tokenizer = load(str(path))
        self.tool_format = of_tokenizer(self.tokenizer)
        self.context_length = context_length(path)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        """llguidance's view of the vocabulary, made at the first constrained request."""
        self.model_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        self.kv_per_token = kv_bytes_per_token(self.model)
        self.slots = slots_for_memory(free_memory, self.kv_per_token, prompt_cache_bytes,
                                      max_slots)
        self.kv_bytes = 0
        self.counters = {"prompt_cache_hits": 0, "prompt_cache_misses": 0,
                         "prompt_tokens_reused": 0, "prompt_tokens_computed": 0,
                         "prompt_tokens_prefilled": 0, "decode_steps": 0, "tokens_decoded": 0}
        """``prompt_tokens_reused``/``computed``: this engine's own bookkeeping of the prompt
        cache. ``prompt_tokens_prefilled``, ``decode_steps`` and ``tokens_decoded``: what
        mlx-lm's BatchGenerator says it did (its ``stats()``), the check on that
        bookkeeping from outside it: a prompt cache bypassed shows as prefilled tokens,
        and a sequence left decoding after it ended as tokens decoded per step."""
        self._prompt_cache = LRUPromptCache(PROMPT_CACHE_ENTRIES, prompt_cache_bytes)
        self._use_prompt_cache = prompt_cache_bytes > 0
        self._eos = StopSequences([(t,) for t in self.tokenizer.eos_token_ids])
        self._batch: BatchGenerator | None = None
        self._running: set[int] = set()
        self._logprobs: dict[int, int] = {}
        """Sequences that asked for log-probabilities, with how many alternatives."""

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        if request.kind == "chat":
            text = self.tokenizer.apply_chat_template(
                request.messages, tools=request.tools, add_generation_prompt=True,
                tokenize=False,
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(request.prompt))

    def detokenizer(self, request: GenerationRequest) -> Detokenizer:
        detokenizer = self.tokenizer.detokenizer
        if request.kind == "completion":
            # mlx-lm's streaming detokenizers drop the leading space of an answer, right
            # after a chat template's "assistant\n" but wrong for a text completion: the
            # prompt "The capital of France is" goes on with " Paris", not "Paris". (Its
            # naive fallback, for tokenizers of neither kind, decodes with the Hugging
            # Face tokenizer, which may still drop it.)
            if hasattr(detokenizer, "trim_space"):  # SentencePiece
                detokenizer.trim_space = False
            if hasattr(detokenizer, "_maybe_trim_space"):  # byte-level BPE
                detokenizer._maybe_trim_space = lambda text: text
        return detokenizer

    def insert(self, prompt: list[int], request: GenerationRequest, max_tokens: int,
               prompt_len: int) -> int:
        if self._batch is None:
            # Made in the batch loop's thread, which makes every later call: MLX streams
            # belong to the thread that creates them.
            self._batch = BatchGenerator(
                self.model, completion_batch_size=self.slots,
                prefill_batch_size=self.slots, prefill_step_size=PREFILL_STEP,
                stream=mx.new_stream(mx.default_device()))
        cache, rest = self._cached_prefix(prompt)
        processors = make_logits_processors(
            presence_penalty=request.presence_penalty or None,
            frequency_penalty=request.frequency_penalty or None,
        )
        if request.json_schema is not None:
            schema = request.json_schema
            processors.append(self._constrain("response_format", lambda: json_grammar(schema),
                                              prompt_len))
        elif request.tools and request.tool_choice != "auto":
            processors.append(self._constrain("tool_choice", lambda: self._forced_call(request),
                                              prompt_len))
        (seq,) = self._batch.insert(
            [rest], max_tokens=[max_tokens], caches=[cache],
            all_tokens=[prompt[:len(prompt) - len(rest)]], samplers=[make_sampler(request)],
            logits_processors=[processors], stop_sequences=[self._eos])
        self._running.add(seq)
        if request.logprobs:
            self._logprobs[seq] = request.top_logprobs
        return seq

    def _forced_call(self, request: GenerationRequest) -> str:
        """The grammar of the tool call ``tool_choice`` requires."""
        fmt = self.tool_format
        if fmt is None or fmt.start != "<tool_call>":
            raise SchemaError("a call can be required only of models that write "
                              "<tool_call> JSON (json_tools)")
        choice = request.tool_choice
        name = choice.get("function", {}).get("name", "") if isinstance(choice, dict) else ""
        return tool_call_grammar(fmt.start, fmt.end, request.tools or [], name)

    def _constrain(self, param: str, grammar_of: Callable[[], str],
                   prompt_len: int) -> GrammarProcessor:
        """The processor that keeps the answer within the grammar ``grammar_of()`` builds
        for the request field ``param`` (named in the 400 when it cannot be built)."""
        try:
            grammar = grammar_of()
        except SchemaError as exc:
            raise RequestRefused(param, str(exc)) from None
        if self._ll_tokenizer is None:
            self._ll_tokenizer = ll_tokenizer(self.path, list(self.tokenizer.eos_token_ids))
        return GrammarProcessor(self._ll_tokenizer, grammar, prompt_len)

    def remove(self, seq: int) -> None:
        if seq not in self._running or self._batch is None:
            return
        self._running.discard(seq)
        self._logprobs.pop(seq, None)
        for cache, tokens in self._batch.remove([seq], return_prompt_caches=True).values():
            self._keep(tokens, cache)

    def step(self) -> list[Step]:
        if self._batch is None:
            return []
        with self._batch.stats() as done:
            _, responses = self._batch.next()
        self.counters["prompt_tokens_prefilled"] += done.prompt_tokens
        self.counters["decode_steps"] += done.generation_steps
        self.counters["tokens_decoded"] += done.generation_tokens
        steps = []
        for r in responses:
            logprob = self._logprob(r.uid, r.token, r.logprobs)
            if r.finish_reason is None:
                steps.append(Step(r.uid, r.token, done=False, logprob=logprob))
                continue
            self._running.discard(r.uid)
            self._logprobs.pop(r.uid, None)
            self._keep(r.all_tokens, r.prompt_cache)
            eos = r.finish_reason == "stop"  # the only stop sequences given are EOS tokens
            steps.append(Step(r.uid, None if eos else r.token, done=True, logprob=logprob))
        self.kv_bytes = self._batch.prompt_cache_nbytes + self._prompt_cache.nbytes
        return steps

    def wait(self) -> float | None:
        return 0.0 if self._running else None

    @property
    def cache_entries(self) -> int:
        return len(self._prompt_cache)

    def _logprob(self, seq: int, token: int, logprobs: mx.array) -> dict[str, Any] | None:
        """``token``'s entry in OpenAI's shape, if ``seq`` asked for log-probabilities:
        its own and the ``top`` most likely tokens' (after the request's logits
        processors: a constrained request shows the constrained distribution)."""
        top = self._logprobs.get(seq)
        if top is None:
            return None
        alternatives = []
        if top:
            best = mx.argpartition(-logprobs, top - 1)[:top]
            values = logprobs[best].tolist()
            alternatives = sorted(zip(best.tolist(), values, strict=True),
                                  key=lambda pair: -pair[1])
        return {**self._token_entry(token, logprobs[token].item()),
                "top_logprobs": [self._token_entry(t, v) for t, v in alternatives]}

    def _token_entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": max(logprob, -9999.0),
                "bytes": list(text.encode())}

    def _cached_prefix(self, prompt: list[int]) -> tuple[list | None, list[int]]:
        """The KV cache of the longest prefix of ``prompt`` computed here before (a copy),
        and the tokens still to prefill (never none: the last prompt token's logits give
        the first new token)."""
        cache, rest = (self._prompt_cache.fetch_nearest_cache(self.model_id, prompt)
                       if self._use_prompt_cache else (None, prompt))
        if cache is not None and not rest:
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        hit = cache is not None
        self.counters["prompt_cache_hits" if hit else "prompt_cache_misses"] += 1
        self.counters["prompt_tokens_reused"] += len(prompt) - len(rest)
        self.counters["prompt_tokens_computed"] += len(rest)
        return cache, rest

    def _keep(self, tokens: list[int], cache: list) -> None:
        """Remember the KV cache of ``tokens`` for a later prompt that starts with them."""
        if self._use_prompt_cache and tokens:
            self._prompt_cache.insert_cache(self.model_id, list(tokens), cache)
