"""The SYNTHETIC engine: deterministic tokens at a set rate, for routing and load tests.

It never runs a model. Token n of a sequence depends only on the token before it and
the sequence length, so a stream resumed on another synthetic worker continues exactly
where it stopped, and a test can compute the expected stream with :func:`next_token`.
It has the real engine's shape (one batch, stepped by the worker's batch loop), so every
routing and failover test runs the worker's real path. Named "synthetic" in READY, logs,
``/v1/models`` and ``mesh`` output; never the default.

It models a prompt cache as the real engine has one (mlx-lm's ``LRUPromptCache``): the
tokens of the sequences it ended, matched by longest common prefix, counted in the same
``prompt_tokens_reused``/``computed`` counters. With a prefill rate, the prompt tokens its
cache does not hold take time before the first token, one prompt after another as on one
GPU, so that where a conversation is routed shows in its time to first token on any
machine (``bench/agents.py``): the prefill is simulated, it costs no CPU.
"""

from __future__ import annotations

import itertools
import threading
import time
from array import array
from dataclasses import dataclass

from mlx_stack.common.generation import GenerationRequest
from mlx_stack.worker.engine import RequestRefused, Step
from mlx_stack.worker.tools import ToolFormat

VOCAB = 50_000
BYTE_TOKENS = 256
FAULT = "[[synthetic-engine-error]]"
"""A prompt containing this makes the synthetic engine raise when the request joins the
batch: the fault switch for tests of how a request's engine error reaches the client."""
STEP_ERROR = "[[synthetic-step-error]]"
"""A prompt containing this makes an engine step raise once the sequence has output
:data:`FAULT_AT` tokens (a Metal out-of-memory, a bad kernel: the whole batch is lost)."""
STEP_HANG = "[[synthetic-step-hang]]"
"""A prompt containing this makes an engine step never return once the sequence has output
:data:`FAULT_AT` tokens (a wedged GPU), while the worker's I/O thread goes on."""
FAULT_AT = 10
"""Where a step fault strikes. A sequence resumed at or past it (on the worker the job
moved to) runs clean, so the job completes there."""
SAY = "[[say]]"
"""A prompt containing this makes the synthetic engine write what follows it (its last
occurrence), one byte a token, then end the sequence: scripted output, such as a model
family's tool-call text, for tests of what the worker does with it."""
CACHE_ENTRIES = 64
"""Sequences the prompt cache keeps by default, as the real engine's
(worker/mlx_engine.py ``PROMPT_CACHE_ENTRIES``)."""
TOKEN_BYTES = 4
CHUNK = 1 << 14
"""Bytes compared at once when matching a prompt against a kept sequence."""


def next_token(sequence: list[int]) -> int:
    """The synthetic engine's next token after ``sequence`` (prompt + generated)."""
    last = sequence[-1] if sequence else 0
    return BYTE_TOKENS + (last * 7919 + len(sequence) * 104_729) % VOCAB


def word(token: int) -> str:
    """The text of a synthetic token: one word, or one byte of a script (:data:`SAY`)."""
    return chr(token) if token < BYTE_TOKENS else f" w{token}"


class SyntheticDetokenizer:
    def __init__(self) -> None:
        self.text = ""

    def add_token(self, token: int) -> None:
        self.text += word(token)

    def finalize(self) -> None:
        pass


@dataclass(slots=True)
class _Sequence:
    tokens: list[int]
    left: int
    due: float
    """When its next token is due (monotonic seconds)."""
    script: bytes | None = None
    """What is left to say (:data:`SAY`), or None for synthetic words."""
    logprobs: bool = False
    """Whether the request asked for log-probabilities (each token is certain: 0.0)."""
    prompt_len: int = 0
    prefilled: float = 0.0
    """When its prompt is computed (monotonic seconds): only then can the cache keep it."""
    fault: str = ""
    """:data:`STEP_ERROR` or :data:`STEP_HANG` when the prompt asks for one and this
    sequence has yet to pass :data:`FAULT_AT`."""


def common_prefix(a: bytes, b: bytes) -> int:
    """How many leading bytes ``a`` and ``b`` share: compared a chunk at a time (one
    memcmp each, never a Python loop over tokens: prompts run to 100 KB), then halved
    within the first chunk that differs."""
    n = min(len(a), len(b))
    lo = 0
    while lo < n:
        hi = min(lo + CHUNK, n)
        if b.startswith(a[lo:hi], lo):
            lo = hi
            continue
        while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
            mid = (lo + hi) // 2
            if b.startswith(a[lo:mid], lo):
                lo = mid
            else:
                hi = mid
        return lo
    return n


class PromptCache:
    """The token sequences (prompt and output) of the last ``entries`` sequences ended,
    least recent first, as mlx-lm's ``LRUPromptCache`` keeps their KV caches: a prompt
    reuses the longest prefix it shares with any of them (a longer one is trimmed), and a
    new entry replaces those that are its prefixes. (mlx-lm also bounds it in bytes; here
    the entries bound it.)"""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries = entries
        self._kept: list[bytes] = []
        """Each sequence packed, :data:`TOKEN_BYTES` a token."""

    def __len__(self) -> int:
        return len(self._kept)

    def match(self, tokens: list[int]) -> int:
        """How many leading ``tokens`` some kept sequence holds."""
        packed = _packed(tokens)
        return max((common_prefix(packed, kept) for kept in self._kept), default=0
                   ) // TOKEN_BYTES

    def keep(self, tokens: list[int]) -> None:
        if self.entries <= 0 or not tokens:
            return
        packed = _packed(tokens)
        self._kept = [kept for kept in self._kept if not packed.startswith(kept)]
        self._kept.append(packed)
        del self._kept[:-self.entries]


def _packed(tokens: list[int]) -> bytes:
    return array("I", tokens).tobytes()


class SyntheticEngine:
    """Emits ``rate`` tokens per second per sequence after ``ttft`` seconds, in ``slots``
    slots; with a ``prefill_rate``, the first token waits for the prompt tokens that its
    ``prompt_cache`` (that many sequences kept) does not hold, at that many per second."""

    kind = "synthetic"
    model_bytes = 0
    kv_bytes = 0
    context_length: int
    """Prompt bytes and generated tokens together, as large as an agent's prompt needs by
    default (a Claude Code request carries ~100 KB of instructions and tools;
    ``--context-length``). A request without ``max_tokens`` runs to it, as with a real
    model; scripts end sooner."""

    def __init__(self, model_id: str, slots: int = 4, rate: float = 200.0,
                 ttft: float = 0.0, tool_format: ToolFormat | None = None,
                 context_length: int = 262_144, prefill_rate: float = 0.0,
                 prompt_cache: int = CACHE_ENTRIES) -> None:
        self.model_id = model_id
        self.context_length = context_length
        self.tool_format = tool_format
        """Set from ``--tool-parser``: the family whose tool calls a script may write."""
        self.slots = slots
        self.rate = rate
        self.ttft = ttft
        self.prefill_rate = prefill_rate
        """Prompt tokens (bytes) computed per second; 0 = at once."""
        self.counters = {"prompt_cache_hits": 0, "prompt_cache_misses": 0,
                         "prompt_tokens_reused": 0, "prompt_tokens_computed": 0}
        """As the real engine counts them (worker/mlx_engine.py)."""
        self._cache = PromptCache(prompt_cache)
        self._prefill_free = 0.0
        """When the prompts inserted so far are computed: the next one's prefill starts
        then (a sequence removed before its prefill ends keeps its time taken)."""
        self._running: dict[int, _Sequence] = {}
        self._ids = itertools.count()

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        text = request.prompt if request.kind == "completion" else "\n".join(
            str(m.get("content", "")) for m in request.messages)
        return list(text.encode("utf-8"))

    def detokenizer(self, request: GenerationRequest) -> SyntheticDetokenizer:
        return SyntheticDetokenizer()

    def insert(self, prompt: list[int], request: GenerationRequest, max_tokens: int,
               prompt_len: int) -> int:
        if request.json_schema is not None:
            raise RequestRefused("response_format", "the synthetic engine cannot constrain "
                                 "its output; use response_format 'text' or a real model")
        if FAULT.encode() in bytes(t for t in prompt if t < BYTE_TOKENS):
            raise RuntimeError("synthetic engine error (fault switch in the prompt)")
        seq = next(self._ids)
        own = bytes(t for t in prompt[:prompt_len] if t < BYTE_TOKENS)
        fault = next((f for f in (STEP_ERROR, STEP_HANG) if f.encode() in own), "")
        prefilled = self._prefill(prompt)
        self._running[seq] = _Sequence(
            list(prompt), max_tokens, prefilled + self.ttft,
            _script(prompt, prompt_len), request.logprobs, prompt_len, prefilled,
            fault if len(prompt) - prompt_len < FAULT_AT else "")
        return seq

    def _prefill(self, prompt: list[int]) -> float:
        """Count what the cache serves of ``prompt``; return when the rest is computed.
        The last prompt token is always computed: its logits give the first new token."""
        reused = max(0, min(self._cache.match(prompt), len(prompt) - 1))
        computed = len(prompt) - reused
        self.counters["prompt_cache_hits" if reused else "prompt_cache_misses"] += 1
        self.counters["prompt_tokens_reused"] += reused
        self.counters["prompt_tokens_computed"] += computed
        now = time.monotonic()
        if self.prefill_rate <= 0:
            return now
        self._prefill_free = max(now, self._prefill_free) + computed / self.prefill_rate
        return self._prefill_free

    @property
    def cache_entries(self) -> int:
        return len(self._cache)

    def remove(self, seq: int) -> None:
        s = self._running.pop(seq, None)
        if s is not None and s.prefilled <= time.monotonic():
            self._cache.keep(s.tokens)  # as the real engine keeps what it had computed

    def wait(self) -> float | None:
        if not self._running:
            return None
        return max(0.0, min(s.due for s in self._running.values()) - time.monotonic())

    def step(self) -> list[Step]:
        now = time.monotonic()
        steps = []
        for seq, s in list(self._running.items()):
            if s.due > now:
                continue
            if s.fault and len(s.tokens) - s.prompt_len == FAULT_AT:
                if s.fault == STEP_HANG:
                    threading.Event().wait()  # never returns
                raise RuntimeError("synthetic engine step error (fault switch in the prompt)")
            if s.script == b"":  # said it all: the end of the sequence
                del self._running[seq]
                self._cache.keep(s.tokens)
                steps.append(Step(seq, None, done=True))
                continue
            if s.script is None:
                token = next_token(s.tokens)
            else:
                token, s.script = s.script[0], s.script[1:]
            s.tokens.append(token)
            s.left -= 1
            s.due += 1.0 / self.rate if self.rate > 0 else 0.0
            if s.left == 0:
                del self._running[seq]
                self._cache.keep(s.tokens)
            logprob = {"token": word(token), "logprob": 0.0,
                       "bytes": list(word(token).encode()), "top_logprobs": []
                       } if s.logprobs else None
            steps.append(Step(seq, token, done=s.left == 0, logprob=logprob))
        return steps


def _script(prompt: list[int], prompt_len: int) -> bytes | None:
    """What a :data:`SAY` prompt still has to say (after what was generated before a
    resume), or None."""
    text = bytes(t for t in prompt[:prompt_len] if t < BYTE_TOKENS)
    at = text.rfind(SAY.encode())
    if at < 0:
        return None
    return text[at + len(SAY):][len(prompt) - prompt_len:]
