"""Choosing a worker for a job: the score from MESH.md and rotating ties.

``score = running/slots + W_MEM * (1 - mem_free/mem_total) + W_REMOTE * remote``

Lower is better. The in-flight count is the broker's own, so the score of a worker rises
the moment a job is dispatched to it. The remote term is small: it breaks ties in favour
of the gateway's own node and never outweighs a real difference in load.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from broker.state import WorkerState

W_MEM = 0.25
W_REMOTE = 0.01
TIE = 0.002
"""Scores this close are equal: free memory jitters between heartbeats by ~0.1% of the
total, which must not decide between equally loaded workers (nor outweigh W_REMOTE)."""


def score(worker: WorkerState, origin_node: str) -> float:
    """The routing score of ``worker`` for a job submitted on node ``origin_node``."""
    info = worker.info
    load = len(worker.running) / max(info.slots, 1)
    mem = 1.0 - worker.mem_free / info.mem_total if info.mem_total > 0 else 0.0
    remote = 1.0 if origin_node and info.node_id != origin_node else 0.0
    return load + W_MEM * min(max(mem, 0.0), 1.0) + W_REMOTE * remote


class Chooser:
    """Picks the lowest-scored worker with a free slot; equal scores take turns."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(
        self, candidates: Iterable[WorkerState], origin_node: str
    ) -> tuple[WorkerState | None, list[tuple[WorkerState, float]]]:
        """Return the chosen worker (None if none has a free slot) and every scored
        candidate, for the routing history."""
        scored = [(w, score(w, origin_node)) for w in candidates if w.free_slots > 0]
        if not scored:
            return None, scored
        best = min(s for _, s in scored)
        tied = [w for w, s in scored if s - best <= TIE]
        return tied[next(self._turn) % len(tied)], scored
