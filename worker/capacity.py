"""How many requests one worker runs at once: slots from the model and the memory.

Each running request holds a KV cache that grows by a fixed number of bytes per token
(layers x KV heads x head size x 2 x dtype). A worker advertises as many slots as KV
caches of ``SLOT_TOKENS`` tokens fit in half of the memory left once the model is loaded
and the prompt cache has its budget, capped by the ``max_slots`` setting. Half, because
the rest of the Mac (other workers, the user's apps) needs memory too, and a Mac that
swaps serves nobody.
"""

from __future__ import annotations

SLOT_TOKENS = 4096
"""Context a slot is sized for (prompt + generation): an agent's turn with its history."""
HEADROOM = 0.5
"""Share of the free memory that running requests' KV caches may use."""


def slots_for_memory(free_bytes: int, kv_bytes_per_token: int, prompt_cache_bytes: int,
                     max_slots: int) -> int:
    """Slots that fit (at least 1: a worker that loaded its model can serve one request;
    at most ``max_slots``)."""
    budget = free_bytes * HEADROOM - prompt_cache_bytes
    per_slot = max(kv_bytes_per_token, 1) * SLOT_TOKENS
    return max(1, min(max_slots, int(budget // per_slot)))
