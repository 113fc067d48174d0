"""The synthetic engine's prompt cache and prefill rate, on the engine alone (no loop, no
sockets): what it reuses of a prompt, what it counts, when a first token is due.

Times are read from ``engine.wait()`` (seconds until the first token is due) right after
an insert, so no test sleeps; the margins cover a slow machine between the two calls.
"""

from __future__ import annotations

import random

from mlx_stack.common.generation import GenerationRequest
from mlx_stack.worker.synthetic import CHUNK, SyntheticEngine, common_prefix, word

SYSTEM = "You are a careful coding agent. Read the files before you change them. " * 40
"""2,880 bytes (prompt tokens, for the synthetic engine)."""


def tokens(text: str) -> list[int]:
    return list(text.encode())


def insert(engine: SyntheticEngine, prompt: list[int], max_tokens: int = 4) -> int:
    request = GenerationRequest(kind="completion", prompt="", max_tokens=max_tokens)
    return engine.insert(prompt, request, max_tokens, len(prompt))


def run_to_end(engine: SyntheticEngine, prompt: list[int], max_tokens: int = 4) -> list[int]:
    """Run one sequence until the engine ends it (rate and prefill at once); its output."""
    seq = insert(engine, prompt, max_tokens)
    out: list[int] = []
    for _ in range(max_tokens + 1):
        for step in engine.step():
            assert step.seq == seq
            if step.token is not None:
                out.append(step.token)
            if step.done:
                return out
    raise AssertionError(f"sequence {seq} did not end")


def counted(engine: SyntheticEngine, prompt: list[int]) -> tuple[int, int]:
    """(reused, computed) prompt tokens the engine counts for one turn of ``prompt`` (run
    to its end, so the cache keeps it, as a client's turn is)."""
    before = dict(engine.counters)
    run_to_end(engine, prompt)
    return (engine.counters["prompt_tokens_reused"] - before["prompt_tokens_reused"],
            engine.counters["prompt_tokens_computed"] - before["prompt_tokens_computed"])


def test_common_prefix_is_exact_at_every_length_and_chunk_boundary() -> None:
    """Against a byte-by-byte count, for differences at the start, inside the first chunk,
    on a chunk boundary and past several chunks, and for one string a prefix of the
    other."""
    rng = random.Random(7)
    base = bytes(rng.randrange(256) for _ in range(3 * CHUNK + 100))
    cuts = [0, 1, 5, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 17, 3 * CHUNK + 99]
    for cut in cuts:
        other = bytearray(base)
        other[cut] ^= 0xFF
        assert common_prefix(base, bytes(other)) == cut, cut
        assert common_prefix(bytes(other), base) == cut, cut
    for length in (0, 3, CHUNK, 2 * CHUNK + 5):
        assert common_prefix(base[:length], base) == length
        assert common_prefix(base, base[:length]) == length


def test_a_follow_up_computes_only_past_the_previous_prompt() -> None:
    """Turn 2 resends turn 1's prompt, its answer (as text: other tokens than the ones
    generated, as a real template's re-tokenized answer may be) and a new message: the
    cache serves exactly turn 1's prompt. Counted as the real engine counts them."""
    engine = SyntheticEngine("s", rate=0)
    first = tokens(SYSTEM + "\nuser: list the files")
    answer = run_to_end(engine, first)
    assert engine.counters == {"prompt_cache_hits": 0, "prompt_cache_misses": 1,
                               "prompt_tokens_reused": 0, "prompt_tokens_computed": len(first)}
    text = "".join(word(t) for t in answer)
    follow_up = first + tokens(f"\n{text}\nuser: open main.py")
    assert counted(engine, follow_up) == (len(first), len(follow_up) - len(first))
    assert engine.counters["prompt_cache_hits"] == 1


def test_the_same_prompt_again_computes_its_last_token_only() -> None:
    """Its last token's logits give the first new token (mlx-lm trims one off an exact
    match too), and a prompt sharing nothing computes everything."""
    engine = SyntheticEngine("s", rate=0)
    prompt = tokens(SYSTEM)
    run_to_end(engine, prompt)
    assert counted(engine, prompt) == (len(prompt) - 1, 1)
    other = tokens("Something else entirely.")
    assert counted(engine, other) == (0, len(other))


def test_no_prompt_cache_computes_every_prompt_whole() -> None:
    engine = SyntheticEngine("s", rate=0, prompt_cache=0)
    prompt = tokens(SYSTEM)
    run_to_end(engine, prompt)
    assert counted(engine, prompt) == (0, len(prompt))


def test_the_cache_keeps_the_last_entries_and_a_conversation_takes_one() -> None:
    """Two entries: a conversation's every turn replaces its previous one (its prefix), so
    after one turn of agent B and three of A, B is still held; a third conversation then
    evicts the least recent, A (B's turn made B the most recent), as an LRU does."""
    engine = SyntheticEngine("s", rate=0, prompt_cache=2)
    a = tokens("A " + SYSTEM)
    b = tokens("B " + SYSTEM)
    run_to_end(engine, b)
    for turn in range(3):
        a = a + run_to_end(engine, a) + tokens(f"\nturn {turn}")
    assert counted(engine, b)[0] == len(b) - 1
    run_to_end(engine, tokens("C " + SYSTEM))
    assert counted(engine, b)[0] == len(b) - 1
    assert counted(engine, a)[0] == 0  # gone: "A " differs from "B " and "C " at once


def test_the_first_token_waits_for_the_uncached_tokens_at_the_prefill_rate() -> None:
    """10,000 bytes/s: a 2,881-byte prompt first seen waits ~0.29 s (+ ttft), its follow-up
    only for its ~30 new bytes; with no prefill rate the first token is due at once."""
    prompt = tokens(SYSTEM + "\n")
    engine = SyntheticEngine("s", rate=0, ttft=0.05, prefill_rate=10_000)
    insert(engine, prompt)
    assert 0.05 + 0.27 < engine.wait() <= 0.05 + len(prompt) / 10_000  # type: ignore[operator]

    warm = SyntheticEngine("s", rate=0)
    answer = run_to_end(warm, prompt)
    warm.prefill_rate, warm.ttft = 10_000, 0.05
    insert(warm, prompt + answer + tokens("user: and now the tests"))
    assert 0.05 < warm.wait() <= 0.05 + 30 / 10_000  # type: ignore[operator]

    instant = SyntheticEngine("s", rate=0)
    insert(instant, prompt)
    assert instant.wait() == 0.0


def test_prompts_prefill_one_after_another() -> None:
    """Three misses inserted together: the third's first token waits for all three
    prefills, as on one GPU (each at its own pace, it would wait for its own only). The
    two before it, removed, keep the time they took."""
    engine = SyntheticEngine("s", rate=0, prefill_rate=10_000)
    seqs = [insert(engine, tokens(f"{agent} {SYSTEM}")) for agent in range(3)]
    for seq in seqs[:2]:
        engine.remove(seq)
    total = 3 * (len(SYSTEM) + 2) / 10_000
    assert total - 0.02 < engine.wait() <= total  # type: ignore[operator]


def test_a_sequence_removed_before_its_prefill_is_not_kept() -> None:
    """Its KV cache was never computed: the next turn finds nothing. Removed once it has
    run (a stop sequence, a cancel), it is kept, as the real engine keeps it."""
    engine = SyntheticEngine("s", rate=0, prefill_rate=100)  # 29 s of prefill
    prompt = tokens(SYSTEM)
    engine.remove(insert(engine, prompt))
    engine.prefill_rate = 0
    assert counted(engine, prompt)[0] == 0

    ran = SyntheticEngine("s", rate=0)
    seq = insert(ran, prompt, max_tokens=100)
    ran.step()
    ran.remove(seq)
    assert counted(ran, prompt + tokens("\n"))[0] == len(prompt)
