"""Choosing a worker for a job: the score from MESH.md and rotating ties.

``score = running/slots + W_MEM * (1 - mem_free/mem_total) + W_REMOTE * remote
          - W_CACHE * cached/prompt``

Lower is better. The in-flight count is the broker's own, so the score of a worker rises
the moment a job is dispatched to it. The remote term is small: it breaks ties in favour
of the gateway's own node and never outweighs a real difference in load.

The cache term sends a conversation back to the worker whose prompt cache holds its
history (``cached``: characters of the prompt that the chains of the jobs it was given
share, a running job's only with its own next turn, see broker/prefixes.py), so its next
turn prefills only the new tokens. It counts
only from
:data:`MIN_CACHED_CHARS` (a shared short system prompt is no reason to move), and it is
worth at most half the slots: a worker holding the prefix but running half its slots
more than another loses to it (one hot prefix, every agent's system prompt, spreads).
A worker without a free slot is never a candidate, whatever it holds. The setting
``cache_routing = false`` drops the term (the matches are still reported with each
decision), so its effect can be measured against routing by load alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from mlx_stack.broker.state import WorkerState
from mlx_stack.common.messages import Submit

W_MEM = 0.25
W_REMOTE = 0.01
W_CACHE = 0.5
MIN_CACHED_CHARS = 1024
"""About 256 tokens: the least prefix worth routing for."""
TIE = 0.002
"""Scores this close are equal: free memory jitters between heartbeats by ~0.1% of the
total, which must not decide between equally loaded workers (nor outweigh W_REMOTE)."""


def score(worker: WorkerState, origin_node: str, cached: float = 0.0) -> float:
    """The routing score of ``worker`` for a job submitted on node ``origin_node``, of whose
    prompt the worker's cache holds the fraction ``cached``."""
    info = worker.info
    load = len(worker.running) / max(info.slots, 1)
    mem = 1.0 - worker.load.mem_free / info.mem_total if info.mem_total > 0 else 0.0
    remote = 1.0 if origin_node and info.node_id != origin_node else 0.0
    return load + W_MEM * min(max(mem, 0.0), 1.0) + W_REMOTE * remote - W_CACHE * cached


def cached_chars(worker: WorkerState, submit: Submit) -> int:
    """Characters of ``submit``'s prompt that ``worker``'s cache probably holds, 0 under
    :data:`MIN_CACHED_CHARS`."""
    n = worker.prefixes.match(submit.prefix_hashes, worker.running)
    chars = submit.prefix_ends[n - 1] if 0 < n <= len(submit.prefix_ends) else 0
    return chars if chars >= MIN_CACHED_CHARS else 0


class Chooser:
    """Picks the lowest-scored worker with a free slot; equal scores take turns.
    ``cache_routing`` false: the prompt cache a worker holds does not enter its score."""

    def __init__(self, cache_routing: bool = True) -> None:
        self._turn = itertools.count()
        self.cache_routing = cache_routing

    def choose(
        self, candidates: Iterable[WorkerState], submit: Submit
    ) -> tuple[WorkerState | None, list[tuple[WorkerState, float, int]]]:
        """Return the chosen worker for ``submit`` (None if none has a free slot) and every
        scored candidate with its cached characters, for the routing history."""
        prompt = submit.prefix_ends[-1] if submit.prefix_ends else 0
        scored = []
        for w in candidates:
            if w.free_slots > 0:
                cached = cached_chars(w, submit)
                share = cached / prompt if prompt and self.cache_routing else 0.0
                scored.append((w, score(w, submit.node_id, share), cached))
        if not scored:
            return None, scored
        best = min(s for _, s, _ in scored)
        tied = [w for w, s, _ in scored if s - best <= TIE]
        return tied[next(self._turn) % len(tied)], scored
