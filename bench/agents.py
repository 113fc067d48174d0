"""Coding agents through one gateway: cache-aware routing against load-only routing and
against one node alone, printed as JSON (issue 27's goals, each with whether it passed).

    .venv/bin/python -m bench.agents [--agents 18] [--turns 8] [--prefill-rate 20000]

An agent's every turn resends its whole history (a long system prompt of its own, then
each tool result and answer so far) and gets a short answer; its turns are sequential,
each after a short pause (its tools run), and the agents run at once. The same agents
(same texts) run three times, each on a fresh mesh of synthetic workers behind one
gateway on ``node-0``: one node alone; three nodes with cache routing (``cache_routing =
true``, the default); three nodes routing by load alone (``cache_routing = false``).
The synthetic workers model a prompt cache and a prefill rate (``mlx-stack worker
--engine synthetic --prefill-rate N``): the prompt bytes a worker's cache does not hold
take 1/N s each before the first token, one prompt after another, so where a
conversation goes shows in its time to first token and in what the mesh gets done, on
two cores (the prefill is simulated; it costs no CPU).

Measured per run: the first turns (all agents at once), then the follow-ups; the workers'
own counters (``prompt_tokens_reused``/``computed``) read between the two, so the
follow-ups' share served from cache is the engines' figure, not the broker's guess; time
to first token as the client sees it; tokens counted in the text received (every answer
compared with what the synthetic engine generates for its prompt: ``inexact_streams``).
On the cache-routing mesh, after the agents: a burst of fresh, unrelated prompts (how it
splits), and the agents again with one system prompt shared by all (no worker may take
more than its share + 25%). The report starts with the date, the commit, the uncommitted
changes and the machine. Run from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from bench.routing import WORD, Streamed, expected_text, pct, provenance, quiet_heap, stream_once
from testkit.harness import Cluster, wait_for

NODES = ("node-0", "node-1", "node-2")
WORDS = ("read", "the", "file", "function", "returns", "None", "when", "test", "fails",
         "patch", "line", "import", "class", "error", "value", "list", "dict", "async",
         "await", "config", "router", "worker", "cache", "token", "stream", "retry")
COUNTERS = ("prompt_cache_hits", "prompt_cache_misses", "prompt_tokens_reused",
            "prompt_tokens_computed")
BROKER_COUNTERS = ("prefix_chains_missed", "prefix_chains_trimmed")
"""Chains the coordinator dropped from its guess of a worker's cache: a predicted match
the cache did not serve, or more chains than the cache's entries (broker/prefixes.py)."""


@dataclass(frozen=True)
class Workload:
    """What the agents send."""

    agents: int = 18
    """A multiple of three, so that an even split is possible (the run lasts as long as
    the busiest node's agents), and six per node, so that each of the three nodes is as
    busy prefilling as the one node alone is with all of them (else the mesh's
    figure is bounded by the agents' own pace, not by the nodes)."""
    turns: int = 8
    system_bytes: int = 20_000
    """Each agent's system prompt (~5,000 tokens of instructions and tool definitions)."""
    tool_bytes: int = 3_000
    """What each turn adds before the answer (a tool result: a file, a test run)."""
    answer_tokens: int = 16
    """A tool call's worth: agents' answers are short, their prompts long."""
    tool_seconds: float = 0.3
    """Each agent pauses up to this long (uniformly drawn) before each next turn, as its
    tools run. Without a pause agents move in lockstep, and routing by load sends a
    follow-up back to its worker by accident: its own job just freed a slot there."""
    shared_system: bool = False
    """Every agent the same system prompt (a hot prefix)."""
    seed: int = 27


@dataclass(frozen=True)
class Workers:
    """How each synthetic worker behaves."""

    slots: int = 8
    rate: float = 100.0
    """Tokens per second per sequence."""
    prefill_rate: float = 20_000.0
    """Prompt bytes per second not served from its cache (a 30 KB history: 1.5 s)."""

    def args(self) -> list[str]:
        """The ``mlx-stack worker`` arguments of such a worker."""
        return ["--engine", "synthetic", "--model", "syn", "--slots", str(self.slots),
                "--rate", str(self.rate), "--prefill-rate", str(self.prefill_rate)]


def words(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        out.append(rng.choice(WORDS))
        length += len(out[-1]) + 1
    return " ".join(out)


@dataclass(frozen=True)
class Script:
    """What one agent sends: its system prompt, then each turn's user message, after a
    pause (the tools its last answer called for run)."""

    system: str
    users: list[str]
    pauses: list[float]


def scripts(workload: Workload) -> list[Script]:
    """Every agent's script (histories distinct from the first byte on: none is a
    prefix of another's, unless the system prompt is shared)."""
    rng = random.Random(workload.seed)
    shared = "You are a coding agent. " + words(rng, workload.system_bytes)
    out = []
    for agent in range(workload.agents):
        system = shared if workload.shared_system else (
            f"You are coding agent {agent:03d}. " + words(rng, workload.system_bytes))
        users = [f"Agent {agent:03d}, turn {turn}, tool result: " +
                 words(rng, workload.tool_bytes) for turn in range(workload.turns)]
        pauses = [0.0] + [rng.uniform(0, workload.tool_seconds)
                          for _ in range(workload.turns - 1)]
        out.append(Script(system, users, pauses))
    return out


@dataclass
class MeshRun:
    """A running mesh behind one gateway, and how many prompts its workers were given."""

    cluster: Cluster
    url: str
    sent: int = 0

    def counters(self) -> Counter[str]:
        """The workers' prompt cache counters, summed, once they count every prompt sent
        (they come with heartbeats), and the coordinator's corrections of its guess of
        their caches."""
        def settled() -> Counter[str] | None:
            total: Counter[str] = Counter()
            for worker in self.cluster.workers():
                total.update({k: worker.load.counters.get(k, 0) for k in COUNTERS})
            counted = total["prompt_cache_hits"] + total["prompt_cache_misses"]
            return total if counted == self.sent else None

        total = wait_for(f"the workers to count {self.sent} prompts", settled, timeout=30)
        broker = self.cluster.control("status").counters
        total.update({k: broker.get(k, 0) for k in BROKER_COUNTERS})
        return total

    def load(self, histories: list[list[dict[str, str]]], agents: list[Script],
             which: range, answer_tokens: int) -> tuple[list[tuple[int, int, Streamed]],
                                                         float]:
        """Every agent at once, each through turns ``which`` one after another: (agent,
        turn, stream) for each, and the seconds from the first send to the last answer."""
        with quiet_heap():
            done = asyncio.run(turns(self.url, histories, agents, which, answer_tokens))
        self.sent += len(done[0])
        return done


async def turns(url: str, histories: list[list[dict[str, str]]], agents: list[Script],
                which: range, answer_tokens: int) -> tuple[list[tuple[int, int, Streamed]],
                                                            float]:
    done: list[tuple[int, int, Streamed]] = []
    limits = httpx.Limits(max_connections=len(histories) + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def agent(a: int) -> None:
            for turn in which:
                await asyncio.sleep(agents[a].pauses[turn])
                histories[a].append({"role": "user", "content": agents[a].users[turn]})
                prompt = "\n".join(m["content"] for m in histories[a])
                got = await stream_once(client, url, prompt, answer_tokens, histories[a],
                                        temperature=0)  # a real model's answers repeat
                histories[a].append({"role": "assistant", "content": got.text})
                done.append((a, turn, got))

        start = time.perf_counter()
        await asyncio.gather(*(agent(a) for a in range(len(histories))))
        return done, time.perf_counter() - start


def ms(values: list[float]) -> dict[str, float]:
    return {q: round(pct(values, p) * 1000, 1) for q, p in (("p50", 0.5), ("p90", 0.9),
                                                            ("p99", 0.99))}


def by_node(streams: list[Streamed]) -> dict[str, int]:
    return dict(sorted(Counter(s.node for s in streams).items()))


def run_agents(mesh: MeshRun, workload: Workload,
               answers: dict[str, str] | None = None) -> dict[str, Any]:
    """The workload's first turns (all agents at once), then its follow-ups. Each answer
    is checked against what the synthetic engine generates for its prompt or, with
    ``answers`` (a real model's), against the answer the same prompt got in an earlier
    run (recorded there when none did yet); tokens are then counted as the events that
    carried text."""
    agents = scripts(workload)
    histories = [[{"role": "system", "content": a.system}] for a in agents]
    mesh.counters()  # every earlier prompt counted: the next reads are this run's
    first, first_s = mesh.load(histories, agents, range(1), workload.answer_tokens)
    between = mesh.counters()
    rest, rest_s = mesh.load(histories, agents, range(1, workload.turns),
                             workload.answer_tokens)
    after = mesh.counters()
    reused = after["prompt_tokens_reused"] - between["prompt_tokens_reused"]
    computed = after["prompt_tokens_computed"] - between["prompt_tokens_computed"]
    node_of = {(a, t): s.node for a, t, s in first + rest}
    every = [s for _, _, s in first + rest]
    if answers is None:
        tokens = sum(len(WORD.findall(s.text)) for s in every)
        inexact = sum(s.text != expected_text(s.content, workload.answer_tokens)
                      for s in every)
    else:
        tokens = sum(s.events for s in every)
        inexact = sum(s.text != answers.setdefault(s.content, s.text) for s in every)
    return {
        "requests": len(every), "seconds": round(first_s + rest_s, 2),
        "tokens_received": tokens, "tokens_per_s": round(tokens / (first_s + rest_s), 1),
        "inexact_streams": inexact,
        "turns_per_node": by_node(every),
        "first_turns": {"seconds": round(first_s, 2), "ttft_ms": ms([s.ttft for *_, s in first]),
                        "agents_per_node": by_node([s for *_, s in first])},
        "follow_ups": {
            "requests": len(rest), "seconds": round(rest_s, 2),
            "ttft_ms": ms([s.ttft for *_, s in rest]),
            "prompt_tokens_reused": reused, "prompt_tokens_computed": computed,
            "served_from_cache": round(reused / (reused + computed), 4),
            "mirror_chains_dropped": {k.removeprefix("prefix_chains_"): after[k] - between[k]
                                      for k in BROKER_COUNTERS},
            "stayed_on_the_previous_turns_node": round(sum(
                node_of[a, t] == node_of[a, t - 1] for a, t, _ in rest) / len(rest), 4)},
    }


def fresh_burst(mesh: MeshRun, streams: int, workload: Workload) -> dict[str, Any]:
    """``streams`` unrelated prompts at once (each as long as a first turn's tool result,
    sharing nothing with anything sent before): how they split over the nodes."""
    rng = random.Random(f"burst-{workload.seed}")
    prompts = [f"Unrelated question {i}: " + words(rng, workload.tool_bytes)
               for i in range(streams)]

    async def burst() -> list[Streamed]:
        limits = httpx.Limits(max_connections=streams + 8)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return list(await asyncio.gather(*(
                stream_once(client, mesh.url, p, workload.answer_tokens) for p in prompts)))

    with quiet_heap():
        results = asyncio.run(burst())
    mesh.sent += streams
    return {"streams": streams, "per_node": by_node(results),
            "inexact_streams": sum(s.text != expected_text(s.content, workload.answer_tokens)
                                   for s in results)}


def start_mesh(tmp: Path, nodes: tuple[str, ...], worker_args: list[str], cache_routing: bool,
               env: dict[str, str] | None = None) -> MeshRun:
    """A broker, one worker (``mlx-stack worker`` + ``worker_args``, serving ``syn``) on
    each node, the gateway on the first; the broker routes with or without its cache
    term. A few short requests warm every process."""
    cluster = Cluster(tmp, env={"MLX_STACK_CACHE_ROUTING": str(cache_routing).lower(),
                                "MLX_STACK_QUEUE_SIZE": "1000", **(env or {})})
    try:
        cluster.broker()
        for node in nodes:
            cluster.worker(*worker_args, node=node)
        mesh = MeshRun(cluster, cluster.gateway(node=nodes[0]))
        with httpx.Client(timeout=60) as client:
            for i in range(2 * len(nodes)):
                client.post(f"{mesh.url}/v1/chat/completions", json={
                    "model": "syn", "max_tokens": 2,
                    "messages": [{"role": "user", "content": f"warm {i}"}]}).raise_for_status()
        mesh.sent = 2 * len(nodes)
        return mesh
    except BaseException:
        cluster.close()
        raise


def goals(one: dict[str, Any], on: dict[str, Any], off: dict[str, Any],
          burst: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    """Issue 27's goals for this run, each with its figure and whether it passed."""
    share = on["follow_ups"]["served_from_cache"] / one["follow_ups"]["served_from_cache"]
    ttft = {q: on["follow_ups"]["ttft_ms"][q] / off["follow_ups"]["ttft_ms"][q]
            for q in ("p50", "p90")}
    speed = on["tokens_per_s"] / one["tokens_per_s"]
    even = burst["streams"] / len(NODES)
    split = [burst["per_node"].get(node, 0) for node in NODES]
    most = max(shared["turns_per_node"].get(node, 0) for node in NODES)
    allowed = 1.25 * shared["requests"] / len(NODES)
    inexact = sum(r["inexact_streams"] for r in (one, on, off, burst, shared))
    out: dict[str, Any] = {
        "follow_up_cache_share_vs_one_node": {"value": round(share, 4), "goal": ">= 0.95",
                                              "pass": share >= 0.95},
        **{f"follow_up_ttft_{q}_vs_load_only": {"value": round(v, 4), "goal": "<= 1/3",
                                                "pass": v <= 1 / 3} for q, v in ttft.items()},
        "tokens_per_s_vs_one_node": {"value": round(speed, 3), "goal": ">= 2.85",
                                     "pass": speed >= 2.85},
        "fresh_burst_split": {"value": split, "goal": f"each {even:g} +- 1",
                              "pass": all(abs(n - even) <= 1 for n in split)},
        "shared_system_prompt_busiest_node": {
            "value": most, "goal": f"<= {allowed:g} (its share + 25%)", "pass": most <= allowed},
        "every_answer_exact": {"value": inexact, "goal": "0 inexact", "pass": inexact == 0},
    }
    out["all_pass"] = all(g["pass"] for g in out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults, engine = Workload(), Workers()
    parser.add_argument("--agents", type=int, default=defaults.agents)
    parser.add_argument("--turns", type=int, default=defaults.turns)
    parser.add_argument("--system-bytes", type=int, default=defaults.system_bytes)
    parser.add_argument("--tool-bytes", type=int, default=defaults.tool_bytes)
    parser.add_argument("--answer-tokens", type=int, default=defaults.answer_tokens)
    parser.add_argument("--tool-seconds", type=float, default=defaults.tool_seconds)
    parser.add_argument("--slots", type=int, default=engine.slots)
    parser.add_argument("--rate", type=float, default=engine.rate)
    parser.add_argument("--prefill-rate", type=float, default=engine.prefill_rate)
    parser.add_argument("--burst", type=int, default=60)
    args = parser.parse_args()
    workload = Workload(args.agents, args.turns, args.system_bytes, args.tool_bytes,
                        args.answer_tokens, args.tool_seconds)
    workers = Workers(args.slots, args.rate, args.prefill_rate)
    tmp = Path(tempfile.mkdtemp(prefix="mlxs-bench-agents-"))
    report: dict[str, Any] = {
        "benchmark": "agents", "command": "python -m bench.agents " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        **provenance(), "workload": asdict(workload), "workers": asdict(workers),
        "gateway": NODES[0]}
    runs: dict[str, Any] = {}
    for name, nodes, cache_routing in (("one_node", NODES[:1], True),
                                       ("cache_routing", NODES, True),
                                       ("load_only", NODES, False)):
        mesh = start_mesh(tmp / name, nodes, workers.args(), cache_routing)
        try:
            runs[name] = run_agents(mesh, workload)
            if name == "cache_routing":
                runs["fresh_burst"] = fresh_burst(mesh, args.burst, workload)
                runs["shared_system_prompt"] = run_agents(
                    mesh, replace(workload, shared_system=True, seed=workload.seed + 1))
        finally:
            mesh.cluster.close()
    report.update(runs)
    report["goals"] = goals(runs["one_node"], runs["cache_routing"], runs["load_only"],
                            runs["fresh_burst"], runs["shared_system_prompt"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
