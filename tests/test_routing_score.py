"""The routing decision as a pure function of the workers' state (no sockets): each
weight is pinned by a case that fails when it is 100 times larger or smaller.

Ten slots per worker make one job weigh 0.1 of load, so the cases below read in jobs:
the memory term (W_MEM = 0.25) is worth about two jobs between a nearly full and a
nearly empty machine, and the remote term (W_REMOTE = 0.01) is worth a tenth of one job:
it decides only between equally loaded workers.
"""

from __future__ import annotations

import collections

from broker.routing import Chooser
from broker.state import WorkerState
from common.protocol import Ready

GIB = 1024**3


def worker(node: str, mem_free_gib: float = 8.0, slots: int = 10) -> WorkerState:
    info = Ready(worker_id=f"{node}-w", node_id=node, model_id="m", slots=slots,
                 mem_total=16 * GIB, mem_free=int(mem_free_gib * GIB))
    return WorkerState(identity=node.encode(), info=info, expires=0.0,
                       mem_free=info.mem_free)


def assign(chooser: Chooser, workers: list[WorkerState], jobs: int, origin: str
           ) -> collections.Counter[str]:
    """Dispatch ``jobs`` one after another (none finishes): where each one went."""
    counts: collections.Counter[str] = collections.Counter()
    for n in range(jobs):
        chosen, _ = chooser.choose(workers, origin)
        assert chosen is not None
        chosen.running.add(f"job-{n}")
        counts[chosen.info.node_id] += 1
    return counts


def test_memory_headroom_weighs_about_two_jobs() -> None:
    """14 vs 2 GiB free of 16: the roomy worker runs two jobs more, never all of them
    (W_MEM x 100: the tight one gets work only once the roomy one is full; W_MEM / 100:
    the difference is under the tie threshold and the split is even)."""
    roomy, tight = worker("roomy", mem_free_gib=14), worker("tight", mem_free_gib=2)
    assert assign(Chooser(), [roomy, tight], 16, origin="elsewhere") == {"roomy": 9, "tight": 7}


def test_equal_workers_split_evenly() -> None:
    workers = [worker("a"), worker("b"), worker("c")]
    assert assign(Chooser(), workers, 30, origin="elsewhere") == {"a": 10, "b": 10, "c": 10}


def test_the_remote_penalty_breaks_a_tie_for_the_local_worker() -> None:
    """Equal load: the gateway's own node wins every time (W_REMOTE / 100 falls under the
    tie threshold, and ties rotate)."""
    chooser = Chooser()
    for _ in range(6):
        local, remote = worker("local"), worker("remote")
        chosen, _ = chooser.choose([remote, local], "local")
        assert chosen is local


def test_the_remote_penalty_never_outweighs_one_job() -> None:
    """The local worker runs one job more: the next goes to the idle remote one
    (W_REMOTE x 100 would keep it local)."""
    local, remote = worker("local"), worker("remote")
    local.running.add("running")
    chosen, scored = Chooser().choose([local, remote], "local")
    assert chosen is remote
    assert [round(s, 4) for _, s in scored] == [0.225, 0.135]


def test_a_full_worker_is_never_chosen() -> None:
    full, other = worker("full", slots=1), worker("other", mem_free_gib=0.1)
    full.running.add("running")
    chosen, scored = Chooser().choose([full, other], "full")
    assert chosen is other and [w for w, _ in scored] == [other]
