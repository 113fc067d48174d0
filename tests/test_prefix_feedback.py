"""The worker corrects the broker's mirror of its prompt cache (broker/prefixes.py), with
no sockets: a RELEASE that says the cache served nothing of a match drops the chains that
made it, and a heartbeat's entry count trims the mirror, oldest stored entry first.

Prompts are chains of 256-character blocks: forty blocks of a system prompt every agent
shares (10,240 characters, far above the minimum match routing weighs), then each
agent's own.
"""

from __future__ import annotations

import pytest

from mlx_stack.broker.jobs import JobTable
from mlx_stack.broker.prefixes import MISS_TOKENS, PrefixMirror
from mlx_stack.common import messages as msgs
from mlx_stack.common.config import Settings
from mlx_stack.common.generation import GenerationRequest

GW = b"gateway"
SYSTEM = [7000 + i for i in range(40)]


def own(agent: int, blocks: int = 2) -> list[int]:
    """Agent ``agent``'s chain: the shared system prompt, then ``blocks`` of its own."""
    return SYSTEM + [100_000 * (agent + 1) + i for i in range(blocks)]


def test_a_miss_drops_the_ended_chains_that_matched_and_nothing_else() -> None:
    """Agent 0's turn ended, agent 1's runs, an unrelated chain ended. Agent 2's prompt
    matched the system prompt through agent 0's chain, and the cache served nothing of
    it: agent 0's chain goes; agent 1's stays (not in the cache yet, its own next turn
    still counts it), and so does the unrelated one."""
    mirror = PrefixMirror()
    mirror.add(own(0), "a0")
    mirror.add(own(1), "a1")
    mirror.add([5, 6, 7], "other")
    running = {"a1", "a2"}
    prompt = own(2)
    assert mirror.match(prompt, running) == len(SYSTEM)
    mirror.add(prompt, "a2")
    assert mirror.missed(prompt, "a2", running) == 1
    assert mirror.match(own(3), running) == 0
    assert mirror.match(own(1, blocks=3), running) == len(SYSTEM) + 2
    assert mirror.match([5, 6, 7, 8], running) == 3


def test_a_miss_keeps_a_chain_that_ended_after_the_lookup() -> None:
    """Agent 1's turn went out for agent 0's chain and the cache served nothing of it;
    meanwhile agent 2's turn, given out after it, ended (its entry stored after agent
    1's lookup): agent 0's chain goes, agent 2's stays."""
    mirror = PrefixMirror()
    mirror.add(own(0), "a0")
    mirror.add(own(1), "a1")
    mirror.add(own(2), "a2")
    mirror.ended("a2")
    assert mirror.missed(own(1), "a1", {"a1"}) == 1
    assert mirror.match(own(0, blocks=3), {"a1"}) == len(SYSTEM)
    assert mirror.match(own(2, blocks=3), {"a1"}) == len(SYSTEM) + 2


def test_the_trim_keeps_the_entries_stored_last() -> None:
    """Agent 0's long turn went out first and ended last: the cache stored its entry
    last, and with room for two entries it holds agents 2's and 0's, not 1's."""
    mirror = PrefixMirror()
    for agent in range(3):
        mirror.add(own(agent), f"a{agent}")
    for agent in (1, 2, 0):
        mirror.ended(f"a{agent}")
    assert mirror.trim(2, ()) == 1
    assert [mirror.match(own(a, blocks=3), ()) for a in range(3)] == [
        len(SYSTEM) + 2, len(SYSTEM), len(SYSTEM) + 2]


def test_the_mirror_keeps_no_more_ended_chains_than_the_cache_has_entries() -> None:
    """The cache holds two entries: the two most recent ended chains stay, the oldest
    goes; a running job's chain is no entry yet and stays whatever the count."""
    mirror = PrefixMirror()
    for agent in range(3):
        mirror.add(own(agent), f"a{agent}")
    mirror.add(own(3), "a3")
    running = {"a3"}
    mirror.trim(2, running)
    assert [mirror.match(own(a, blocks=3), ()) for a in range(4)] == [
        len(SYSTEM), len(SYSTEM) + 2, len(SYSTEM) + 2, len(SYSTEM) + 2]
    mirror.trim(0, running)
    assert mirror.match(own(1, blocks=3), running) == 0
    assert mirror.match(own(3, blocks=3), running) == len(SYSTEM) + 2


def table() -> JobTable:
    return JobTable(Settings(grace=5.0, heartbeat_liveness=120))


def ready(t: JobTable, name: str, load: msgs.WorkerLoad | None = None) -> None:
    t.worker_message(name.encode(), msgs.Ready(worker_id=name, node_id=name, model_id="m",
                                               slots=4, load=load or msgs.WorkerLoad()), 0.0)


def run(t: JobTable, job_id: str, chain: list[int], reused: int, computed: int = 500
        ) -> str:
    """Submit a job of prompt ``chain`` and end it with a RELEASE that says ``reused``
    tokens came from the cache; returns its worker."""
    t.gateway_message(GW, msgs.Submit(
        job_id=job_id, model="m", request=GenerationRequest(kind="chat"),
        prefix_hashes=chain, prefix_ends=[256 * (i + 1) for i in range(len(chain))]), 0.0)
    worker = t.routes[-1].worker_id
    t.worker_message(worker.encode(), msgs.Release(
        job_id=f"{job_id}/0", prompt_tokens_reused=reused, prompt_tokens_computed=computed),
        0.0)
    return worker


def predicted(t: JobTable, worker: str, chain: list[int]) -> int:
    """Characters of ``chain`` that ``worker``'s mirror matches (as routing counts)."""
    (state,) = [w for w in t.workers.values() if w.info.worker_id == worker]
    return state.prefixes.match(chain, state.running) * 256


@pytest.mark.parametrize("served", [0, MISS_TOKENS - 1, MISS_TOKENS, 2000])
def test_a_release_that_served_nothing_of_a_predicted_match_corrects_the_mirror(
        served: int) -> None:
    """Agent 0's turn ran on w; agent 1's turn went there for the system prompt its cache
    should hold. Its RELEASE says the cache served ``served`` tokens: under
    :data:`MISS_TOKENS`, agent 0's chain was evicted there, and agent 0's next turn finds
    only the system prompt (held since agent 1's own turn ended). The route log records
    what was served either way."""
    t = table()
    ready(t, "w")
    assert run(t, "a0", own(0), reused=0) == "w"
    assert t.routes[-1].candidates[0].cached == 0
    assert run(t, "a1", own(1), reused=served) == "w"
    assert t.routes[-1].candidates[0].cached == len(SYSTEM) * 256
    assert (t.routes[-1].reused, t.routes[-1].computed) == (served, 500)
    kept = predicted(t, "w", own(0, blocks=3))
    assert kept == (len(SYSTEM) if served < MISS_TOKENS else len(SYSTEM) + 2) * 256
    assert t.counters["prefix_chains_missed"] == (1 if served < MISS_TOKENS else 0)


def test_a_short_prompt_served_little_is_no_miss() -> None:
    """A prompt too short for routing to count its match: the cache serving few tokens of
    it says nothing of the chains it shares, which stay."""
    t = table()
    ready(t, "w")
    run(t, "x", [1, 2], reused=0)
    run(t, "y", [1, 3], reused=10)
    assert t.routes[-1].candidates[0].cached == 0
    assert predicted(t, "w", [1, 2]) == 2 * 256


def test_heartbeats_trim_the_mirror_to_the_cache() -> None:
    """Three turns ended on w. The first heartbeat after their RELEASEs may have counted
    the cache before their entries were in it (a stop sequence's job is released before
    its sequence leaves the engine): its count of two trims nothing. The next one's
    does: the oldest turn's chain goes."""
    t = table()
    ready(t, "w")
    for agent in range(3):
        run(t, f"a{agent}", own(agent), reused=40 * 64)  # the system prompt, served
    whole = (len(SYSTEM) + 2) * 256

    def beat(entries: int) -> list[int]:
        t.worker_message(b"w", msgs.Heartbeat(load=msgs.WorkerLoad(
            cache_entries=entries)), 1.0)
        return [predicted(t, "w", own(a)) for a in range(3)]

    assert beat(2) == [whole] * 3
    assert beat(2) == [len(SYSTEM) * 256, whole, whole]
    assert t.counters["prefix_chains_trimmed"] == 1
