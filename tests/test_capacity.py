"""Slots from memory: as many KV caches of SLOT_TOKENS tokens as fit in half the free
memory, after the prompt cache's budget, between 1 and max_slots."""

from __future__ import annotations

import pytest

from mlx_stack.worker.capacity import SLOT_TOKENS, slots_for_memory

GIB = 1024**3
SMOLLM2_KV = 46_080
"""Bytes per token of SmolLM2-135M's KV cache in float32: 30 layers x 3 KV heads x 64 x 2 x 4."""


@pytest.mark.parametrize(("free", "prompt_cache", "cap", "slots"), [
    (20 * GIB, 1 * GIB, 8, 8),      # plenty: the cap decides
    (2 * GIB, 0, 64, 5),            # 1 GiB for KV / 180 MiB per slot
    (4 * GIB, 1 * GIB, 64, 5),      # the prompt cache's budget comes first
    (1 * GIB, 1 * GIB, 8, 1),       # nothing left: still one request at a time
])
def test_slots_fit_half_the_free_memory(free: int, prompt_cache: int, cap: int,
                                        slots: int) -> None:
    assert slots_for_memory(free, SMOLLM2_KV, prompt_cache, cap) == slots


def test_a_bigger_kv_cache_per_token_gets_fewer_slots() -> None:
    llama_8b_fp16 = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head size x K,V x bytes
    assert SLOT_TOKENS * llama_8b_fp16 == 512 * 1024**2
    assert slots_for_memory(10 * GIB, llama_8b_fp16, 1 * GIB, 64) == 8
    assert slots_for_memory(10 * GIB, SMOLLM2_KV, 1 * GIB, 64) == 22
