"""The routing decision as a pure function of the workers' state (no sockets): each
weight is pinned by a case that fails when it is 100 times larger or smaller.

Ten slots per worker make one job weigh 0.1 of load, so the cases below read in jobs:
the memory term (W_MEM = 0.25) is worth about two jobs between a nearly full and a
nearly empty machine, the remote term (W_REMOTE = 0.01) is worth a tenth of one job: it
decides only between equally loaded workers, and the cache term (W_CACHE = 0.5) is worth
up to five jobs for a prompt the worker's cache holds whole.
"""

from __future__ import annotations

import collections

from mlx_stack.broker.routing import MIN_CACHED_CHARS, Chooser
from mlx_stack.broker.state import WorkerState
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.messages import Ready, Submit, WorkerLoad

GIB = 1024**3


def worker(node: str, mem_free_gib: float = 8.0, slots: int = 10) -> WorkerState:
    info = Ready(worker_id=f"{node}-w", node_id=node, model_id="m", slots=slots,
                 mem_total=16 * GIB, load=WorkerLoad(mem_free=int(mem_free_gib * GIB)))
    return WorkerState(identity=node.encode(), info=info, expires=0.0, load=info.load)


def job(origin: str, chain: int = 0, blocks: int = 0, block_chars: int = 256) -> Submit:
    """A SUBMIT from node ``origin`` whose prompt is ``blocks`` blocks of conversation
    ``chain`` (its prefix hashes, as gateway/prefix.py chains them: a prefix shared is a
    list prefix shared)."""
    return Submit(job_id="j", model="m", request=GenerationRequest(kind="chat"),
                  node_id=origin, prefix_hashes=[chain * 1000 + i for i in range(blocks)],
                  prefix_ends=[block_chars * (i + 1) for i in range(blocks)])


def assign(chooser: Chooser, workers: list[WorkerState], jobs: int, origin: str
           ) -> collections.Counter[str]:
    """Dispatch ``jobs`` one after another (none finishes): where each one went."""
    counts: collections.Counter[str] = collections.Counter()
    for n in range(jobs):
        chosen, _ = chooser.choose(workers, job(origin))
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
        chosen, _ = chooser.choose([remote, local], job("local"))
        assert chosen is local


def test_the_remote_penalty_never_outweighs_one_job() -> None:
    """The local worker runs one job more: the next goes to the idle remote one
    (W_REMOTE x 100 would keep it local)."""
    local, remote = worker("local"), worker("remote")
    local.running.add("running")
    chosen, scored = Chooser().choose([local, remote], job("local"))
    assert chosen is remote
    assert [round(s, 4) for _, s, _ in scored] == [0.225, 0.135]


def test_a_full_worker_is_never_chosen() -> None:
    full, other = worker("full", slots=1), worker("other", mem_free_gib=0.1)
    full.running.add("running")
    full.prefixes.add(job("full", chain=1, blocks=40).prefix_hashes)
    chosen, scored = Chooser().choose([full, other], job("full", chain=1, blocks=40))
    assert chosen is other and [w for w, _, _ in scored] == [other]  # whatever it holds


def test_a_conversation_goes_back_to_the_worker_that_holds_its_history() -> None:
    """Turn 1 of each of 6 conversations spreads; every next turn (its chain grown by a
    few blocks) goes where its last turn finished, though that worker runs a job more
    (W_CACHE / 100: the tie rotation scatters them)."""
    chooser, workers = Chooser(), [worker("a"), worker("b"), worker("c")]
    home = {}
    for conversation in range(6):
        first = job("elsewhere", chain=conversation, blocks=8)
        chosen, _ = chooser.choose(workers, first)
        assert chosen is not None
        chosen.prefixes.add(first.prefix_hashes)
        home[conversation] = chosen
    assert len({w.info.node_id for w in home.values()}) == 3
    for conversation, worker_ in home.items():
        worker_.running.add("another job")
        chosen, scored = chooser.choose(workers, job("elsewhere", chain=conversation,
                                                     blocks=12))
        assert chosen is worker_
        assert [c for w, _, c in scored if w is worker_] == [8 * 256]
        worker_.running.discard("another job")


def test_a_short_shared_prefix_is_no_reason_to_move() -> None:
    """Under MIN_CACHED_CHARS the match is not weighed: an equal split, as without one."""
    assert MIN_CACHED_CHARS > 1000
    short = job("elsewhere", chain=1, blocks=2, block_chars=500)  # 1,000 chars
    holder, other = worker("holder"), worker("other")
    holder.prefixes.add(short.prefix_hashes)
    _, scored = Chooser().choose([holder, other], short)
    assert [c for _, _, c in scored] == [0, 0]
    assert assign_jobs(Chooser(), [holder, other], short, 4) == {"holder": 2, "other": 2}


def test_a_hot_prefix_spreads_once_its_holder_runs_half_its_slots_more() -> None:
    """Every agent with one system prompt: the holder takes jobs until it runs five more
    than an idle worker (W_CACHE = 0.5 of ten slots), then the others take them, and
    learn the prefix themselves (W_CACHE x 100: everything piles onto the holder)."""
    chooser, holder, idle = Chooser(), worker("holder"), worker("idle")
    shared = job("elsewhere", chain=7, blocks=16)
    holder.prefixes.add(shared.prefix_hashes)
    went = assign_jobs(chooser, [holder, idle], shared, 8)
    assert went == {"holder": 6, "idle": 2}


def assign_jobs(chooser: Chooser, workers: list[WorkerState], submit: Submit, jobs: int
                ) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for n in range(jobs):
        chosen, _ = chooser.choose(workers, submit)
        assert chosen is not None
        chosen.running.add(f"job-{n}")
        counts[chosen.info.node_id] += 1
    return counts


def test_without_cache_routing_the_holder_of_a_history_wins_nothing() -> None:
    """``cache_routing = false``: the worker that holds a conversation's history, running
    one job more, loses the next turn to the idle one (as routing by load alone would),
    and the match is still reported with the decision (the switch ignored: it keeps it)."""
    for cache_routing, winner in ((True, "holder"), (False, "idle")):
        holder, idle = worker("holder"), worker("idle")
        holder.prefixes.add(job("elsewhere", chain=3, blocks=8).prefix_hashes)
        holder.running.add("another job")
        chosen, scored = Chooser(cache_routing).choose([holder, idle],
                                                       job("elsewhere", chain=3, blocks=12))
        assert chosen is not None and chosen.info.node_id == winner, cache_routing
        assert [c for _, _, c in scored] == [8 * 256, 0]


def chained(job_id: str, hashes: list[int]) -> Submit:
    """A SUBMIT of blocks ``hashes`` (256 characters each)."""
    return Submit(job_id=job_id, model="m", request=GenerationRequest(kind="chat"),
                  node_id="elsewhere", prefix_hashes=hashes,
                  prefix_ends=[256 * (i + 1) for i in range(len(hashes))])


def sibling(agent: int, turn_blocks: int = 8) -> Submit:
    """Agent ``agent``'s turn: 40 blocks of a system prompt every agent shares, then
    ``turn_blocks`` of its own history."""
    return chained(f"agent-{agent}-{turn_blocks}",
                   [7000 + i for i in range(40)] +
                   [100_000 * (agent + 1) + i for i in range(turn_blocks)])


def dispatch(chooser: Chooser, workers: list[WorkerState], submit: Submit) -> WorkerState:
    """Choose and start ``submit`` as JobTable does: running, and its chain mirrored."""
    chosen, _ = chooser.choose(workers, submit)
    assert chosen is not None
    chosen.running.add(submit.job_id)
    chosen.prefixes.add(submit.prefix_hashes, submit.job_id)
    return chosen


def test_siblings_of_a_running_job_split_by_load() -> None:
    """Six agents with one system prompt start at once. The first one's worker holds
    nothing of it until that job ends (a worker stores a prompt's cache when its sequence
    ends), so the others split by load, two each (counting the chains of running jobs
    as held piles them onto the first worker: 4/2/0)."""
    chooser, workers = Chooser(), [worker("a"), worker("b"), worker("c")]
    went = collections.Counter(dispatch(chooser, workers, sibling(agent)).info.node_id
                               for agent in range(6))
    assert went == {"a": 2, "b": 2, "c": 2}


def test_a_finished_jobs_prefix_draws_siblings_and_a_running_jobs_its_own_next_turn() -> None:
    """Once a job has ended, its worker's cache holds its prompt: a sibling sharing its
    system prompt goes there though it runs a job more. And a conversation's next turn
    sent before the broker learns that its last turn ended (the gateway has the FINAL
    from the worker first) still goes back to that worker, the whole chain it extends
    being its own (not counting running jobs at all sends it to the idle worker)."""
    chooser, holder, idle = Chooser(), worker("holder"), worker("idle")
    first = dispatch(chooser, [holder, idle], sibling(0))
    assert first is holder  # equal scores: the first in turn
    holder.running.clear()  # its FINAL reached the broker
    holder.running.add("another job")
    assert dispatch(chooser, [holder, idle], sibling(1)) is holder
    busy, other = worker("busy"), worker("other")
    turn = chained("turn-1", [9000 + i for i in range(20)])
    assert dispatch(Chooser(), [busy, other], turn) is busy
    # Still running there (its FINAL not seen yet) when the next turn comes.
    assert dispatch(Chooser(), [busy, other], chained(
        "turn-2", turn.prefix_hashes + [9100 + i for i in range(4)])) is busy
