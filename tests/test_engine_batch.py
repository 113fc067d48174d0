"""The real engine's batch, read from mlx-lm's own counters (BatchGenerator ``stats()``)
rather than the worker's bookkeeping: a sequence that ends (removed when its client left
or a stop string matched, or finished at max_tokens) stops decoding, and a prompt that
starts with one the engine ended before is prefilled only past it (issue 27).

An earlier audit kept a removed sequence decoding, and bypassed the prompt cache, with
the worker's own counters unchanged; both show here."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_stack.common.generation import GenerationRequest
from mlx_stack.worker.default_model import DEFAULT_MODEL_ID
from mlx_stack.worker.mlx_engine import MlxEngine

pytestmark = pytest.mark.model
GiB = 1 << 30


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> MlxEngine:
    return MlxEngine(models_dir / DEFAULT_MODEL_ID, DEFAULT_MODEL_ID, max_slots=4,
                     prompt_cache_bytes=GiB, free_memory=8 * GiB)


def chat(text: str) -> GenerationRequest:
    return GenerationRequest(kind="chat", messages=[{"role": "user", "content": text}],
                             temperature=0.0)


def start(engine: MlxEngine, request: GenerationRequest, max_tokens: int) -> int:
    prompt = engine.encode_prompt(request)
    return engine.insert(prompt, request, max_tokens, len(prompt))


def decoding(engine: MlxEngine, steps: int) -> float:
    """Sequences per decode step, by the engine's own count, over the next ``steps``."""
    before = dict(engine.counters)
    for _ in range(steps):
        engine.step()
    decoded = engine.counters["tokens_decoded"] - before["tokens_decoded"]
    return decoded / (engine.counters["decode_steps"] - before["decode_steps"])


def test_a_removed_or_finished_sequence_stops_decoding(engine: MlxEngine) -> None:
    long = [start(engine, chat(f"Tell a long story about {t}."), 200)
            for t in ("the sea", "a rocket")]
    gone = start(engine, chat("Tell a long story about a cat."), 200)
    short = start(engine, chat("Say hello."), 6)
    assert decoding(engine, 4) == 4  # prompts prefilled: all four decode together
    engine.remove(gone)  # a client left, or a stop string matched (the runner removes it)
    finished = [s for _ in range(8) for s in engine.step() if s.done]
    assert [s.seq for s in finished] == [short]  # ended at its max_tokens
    assert decoding(engine, 5) == 2  # only the two long ones are left
    for seq in long:
        engine.remove(seq)
    assert engine.step() == [] and engine.wait() is None


def test_a_follow_up_prompt_is_prefilled_only_past_what_the_engine_kept(
        engine: MlxEngine) -> None:
    rules = " ".join(f"Rule {i}: keep answers short and about gardening." for i in range(25))
    history = [{"role": "system", "content": rules},
               {"role": "user", "content": "What should I plant in spring?"}]
    first = GenerationRequest(kind="chat", messages=history, temperature=0.0)
    seq = start(engine, first, 8)
    while not any(s.done for s in engine.step()):
        pass
    follow = GenerationRequest(kind="chat", temperature=0.0, messages=[
        *history, {"role": "assistant", "content": "Peas."},
        {"role": "user", "content": "And in autumn?"}])
    prompt = engine.encode_prompt(follow)
    before = engine.counters["prompt_tokens_prefilled"]
    seq = engine.insert(prompt, follow, 4, len(prompt))
    engine.step()
    prefilled = engine.counters["prompt_tokens_prefilled"] - before
    assert len(prompt) > 250 and prefilled < 40, (len(prompt), prefilled)
    engine.remove(seq)
