"""The chaos run of issue 28, written once for tests/test_chaos_hosts.py (which asserts its
outcome) and bench/chaos.py (which reports it over several seeds).

Everything at once: three netns hosts, node-c still on the previous protocol; 5% packet
loss on node-b's link; two workers SIGKILLed and one SIGSTOPped for 2 s, the standby
broker and then the coordinator's broker SIGKILLed (and started again), in a seeded
random order of moments; an engine step error in every 100th stream; ``streams``
streams, ``CONCURRENCY`` at a time, through the two current nodes' gateways and the old
node's own. Every stream's text is compared with what the synthetic engine generates for
its prompt, and every fault records whether streams were live when it struck (the last
fault could otherwise land after the traffic ends and prove nothing).

A request whose connection failed before any response is sent again, as HTTP clients do
(the openai SDK: twice), and counted: the gateway saw such a client leave while it read
the body, under heavy load. A stream that had begun never is.
"""

from __future__ import annotations

import asyncio
import collections
import random
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from mlx_stack.common import wire
from mlx_stack.worker.synthetic import STEP_ERROR
from testkit import netns
from testkit.harness import Proc, healthy, wait_for
from testkit.netns import HostMesh, drop
from testkit.scenarios import expected_text
from testkit.sse import ChatStream, chat_body, read_chat

STREAMS = 500
CONCURRENCY = 120
TOKENS = 40
SEED = 20261207
"""The test's seed, and the benchmark's first."""
PAUSE_S = 2.0
"""How long a SIGSTOPped worker stays stopped: past the liveness (3 x 0.5 s)."""
RATE = 25
"""Each synthetic worker's tokens per second per stream (a stream of 40 tokens: 1.6 s)."""
SLOTS = 64
"""Each worker's slots (120 streams at a time over 8 workers, 6 of them current)."""
LOSS_PERCENT = 5
"""Packets dropped at random on node-b's link, both ways, for the whole run."""


def unavailable() -> str | None:
    """Why the chaos run cannot run here (it needs root, iproute2 and nftables), or None."""
    return netns.available() or (None if shutil.which("nft") else
                                 "nftables (`nft`) is not installed")


def content_of(i: int) -> str:
    """Stream ``i``'s prompt: every 100th makes an engine step raise mid-batch (the
    whole batch of its worker is lost: each of its jobs counts a lost worker)."""
    return f"chaos {i}" + (f" {STEP_ERROR}" if i % 100 == 7 else "")


@dataclass
class Fault:
    """One fault of the schedule, and whether it struck while streams were live."""

    kind: str
    """"SIGKILL worker", "SIGSTOP worker 2 s" or "SIGKILL broker, start again"."""
    target: str
    """The worker ("node-a/1": node, then its number there) or the broker's node."""
    planned_s: float
    """When it was due: seconds after the first stream's first text."""
    at_s: float | None = None
    """When it struck: seconds after the first request left (None: it never did)."""
    live: int = 0
    """How many streams had output and had not ended at that moment."""

    @property
    def struck_live(self) -> bool:
        return self.at_s is not None and self.live > 0


@dataclass
class ChaosResult:
    """What one chaos run's clients saw, and what struck them."""

    seed: int
    streams: int
    ok: int
    """Streams that ended well with their exact text."""
    failed: dict[int, str]
    """Streams that ended with an error (refusal, error event, broken or timed-out
    read), by number: why, when, and whether text had come."""
    wrong: list[int]
    """Streams that ended well with another text than their prompt's."""
    retried: int
    """Requests sent again because their connection failed before any response."""
    faults: list[Fault]
    step_errors: int
    """Engine step errors the workers logged (``engine_step_failed``)."""
    duration_s: float
    """From the first request to the last stream's end."""
    stream_p50_s: float
    stream_p90_s: float
    stream_max_s: float
    """A stream's time, first request to its end, over the streams that ended well."""
    max_stall_s: float
    """The longest wait between two chunks of any stream (its normal gap: 0.04 s)."""
    route_outcomes: dict[str, int]
    """The coordinator's routes by outcome, since it last started."""
    stream_seconds: list[float] = field(default_factory=list, repr=False)
    """Every ok stream's time (a benchmark pools them over runs)."""

    @property
    def faults_struck(self) -> int:
        return sum(f.struck_live for f in self.faults)


class Traffic:
    """The streams, ``CONCURRENCY`` at a time, and how many have output right now."""

    def __init__(self, urls: list[str], auth: dict[str, str], streams: int) -> None:
        self.urls, self.auth, self.streams = urls, auth, streams
        self.live = 0
        self.flowing = threading.Event()
        self.started = 0.0
        """When the first request left (``time.perf_counter``)."""
        self.duration = 0.0
        self.results: list[ChatStream | Exception] = [Exception("never read")] * streams
        self.seconds: list[float] = [0.0] * streams
        self.retried = 0

    async def one(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, i: int) -> None:
        async with gate:
            answered, output = asyncio.Event(), Output(self)
            url, body = self.urls[i % len(self.urls)], chat_body(content_of(i), TOKENS)
            began = time.perf_counter()
            try:
                try:
                    stream = await read_chat(client, url, body, started=answered,
                                             flowing=output)
                except httpx.TransportError:
                    if answered.is_set():
                        raise
                    self.retried += 1
                    stream = await read_chat(client, url, body, flowing=output)
                self.results[i] = stream.check()
                self.seconds[i] = time.perf_counter() - began
            except Exception as exc:  # counted and shown by the caller
                self.results[i] = RuntimeError(f"{exc!r} at {time.strftime('%H:%M:%S')}, "
                                               f"after output: {output.began}")
            finally:
                self.live -= output.began

    async def run(self) -> None:
        gate = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY + 10)
        self.started = time.perf_counter()
        async with httpx.AsyncClient(timeout=60, limits=limits, headers=self.auth) as client:
            await asyncio.wait_for(asyncio.gather(
                *(self.one(client, gate, i) for i in range(self.streams))), timeout=240)
        self.duration = time.perf_counter() - self.started


class Output:
    """One stream's ``flowing`` signal: the stream counts as live from its first text."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self.began = False

    def set(self) -> None:
        if not self.began:
            self.began = True
            self.traffic.live += 1
            self.traffic.flowing.set()


def start_hosts(mesh: HostMesh) -> tuple[dict[str, Proc], list[str]]:
    """Brokers on node-a and node-b, then node-c's on the previous protocol; three
    workers (64 slots, 25 tokens/s) on each current node and two on node-c, and a gateway
    on each node. Returns the workers by name ("node-a/0") and the URLs the streams go to
    in turn (the current nodes twice as often), once every gateway is healthy."""
    older = {"MLX_STACK_TEST_PROTOCOL": str(wire.PROTOCOL - 1)}
    for node in ("node-a", "node-b"):
        mesh.start_broker(node)
    mesh.start("broker", node="node-c", env=older)
    workers = {}
    for node in ("node-a", "node-b", "node-c"):
        env = older if node == "node-c" else {}
        for k in range(3 if node != "node-c" else 2):
            workers[f"{node}/{k}"] = mesh.start(
                "worker", "--engine", "synthetic", "--model", "syn", "--slots", str(SLOTS),
                "--rate", str(RATE), node=node, env=env)
        mesh.start("gateway", "--host", mesh.hosts.addr[node], "--port",
                   str(netns.GATEWAY_PORT), node=node, env=env)
    wait_for("node-a coordinating 6 workers, node-c shown incompatible",
             lambda: mesh.status_says("node-a", lambda s: s.coordinating
                                      and len(s.workers) == 6 and s.incompatible),
             timeout=40)
    urls = [mesh.gateway_url(node) for node in ("node-a", "node-b", "node-a", "node-b",
                                                "node-c")]
    for url in set(urls):
        wait_for(f"gateway {url}", lambda u=url: healthy(u), timeout=30)
    return workers, urls


def schedule(rng: random.Random, mesh: HostMesh, workers: dict[str, Proc]
             ) -> list[tuple[Fault, Callable[[], None]]]:
    """The five faults, each with what strikes it: two current workers SIGKILLed and a
    third SIGSTOPped, the standby broker and then the coordinator's restarted, at
    moments drawn from ``rng`` within the first 6 s of output."""
    current = sorted(w for w in workers if not w.startswith("node-c"))
    killed, stopped = rng.sample(current, 2), rng.choice(current)
    while stopped in killed:
        stopped = rng.choice(current)

    def restart_broker(node: str) -> None:
        mesh.brokers[node].kill(signal.SIGKILL)
        mesh.brokers[node] = mesh.start("broker", node=node)

    def pause(name: str) -> None:
        workers[name].kill(signal.SIGSTOP)
        # The next faults strike meanwhile.
        threading.Timer(PAUSE_S, workers[name].kill, (signal.SIGCONT,)).start()

    actions: list[tuple[str, str, Callable[[], None]]] = [
        ("SIGKILL worker", killed[0], lambda: workers[killed[0]].kill()),
        (f"SIGSTOP worker {PAUSE_S:g} s", stopped, lambda: pause(stopped)),
        ("SIGKILL broker, start again", "node-b", lambda: restart_broker("node-b")),
        ("SIGKILL worker", killed[1], lambda: workers[killed[1]].kill()),
        ("SIGKILL broker, start again", "node-a", lambda: restart_broker("node-a")),
    ]
    moments = sorted(rng.uniform(0.5, 6.0) for _ in actions)
    return [(Fault(kind, target, round(at, 3)), action)
            for (kind, target, action), at in zip(actions, moments, strict=True)]


def strike(faults: list[tuple[Fault, Callable[[], None]]], traffic: Traffic) -> None:
    """From the first stream's first text on, each fault at its moment (on a thread)."""
    traffic.flowing.wait(60)
    start = time.perf_counter()
    for fault, action in faults:
        time.sleep(max(0.0, start + fault.planned_s - time.perf_counter()))
        fault.at_s, fault.live = round(time.perf_counter() - traffic.started, 3), traffic.live
        action()


def run_chaos(mesh: HostMesh, seed: int = SEED, streams: int = STREAMS) -> ChaosResult:
    """The chaos run on ``mesh``, a HostMesh over netns hosts node-a, node-b and node-c
    with nothing started yet; the caller closes it (and shows its logs if it failed).
    Raises if the mesh does not come up or the streams do not end within 240 s."""
    rng = random.Random(seed)
    workers, urls = start_hosts(mesh)
    drop(mesh.hosts, "node-b", LOSS_PERCENT)
    faults = schedule(rng, mesh, workers)
    traffic = Traffic(urls, mesh.auth, streams)
    chaos_thread = threading.Thread(target=strike, args=(faults, traffic), daemon=True)
    chaos_thread.start()
    asyncio.run(traffic.run())
    chaos_thread.join(30)

    failed = {i: str(r) for i, r in enumerate(traffic.results) if isinstance(r, Exception)}
    ended = [(i, r) for i, r in enumerate(traffic.results) if isinstance(r, ChatStream)]
    wrong = [i for i, r in ended if r.text != expected_text(content_of(i), TOKENS)]
    seconds = [traffic.seconds[i] for i, _ in ended if i not in wrong]
    routes = mesh.try_control("routes", last=1000, endpoint=mesh.broker_endpoint("node-a"))
    return ChaosResult(
        seed=seed, streams=streams, ok=len(seconds), failed=failed, wrong=wrong,
        retried=traffic.retried, faults=[fault for fault, _ in faults],
        step_errors=sum(w.output().count("engine_step_failed") for w in workers.values()),
        duration_s=round(traffic.duration, 3),
        stream_p50_s=round(statistics.median(seconds), 3) if seconds else 0.0,
        stream_p90_s=round(statistics.quantiles(seconds, n=10)[-1], 3)
        if len(seconds) > 1 else 0.0,
        stream_max_s=round(max(seconds, default=0.0), 3),
        max_stall_s=round(max((r.longest_gap for _, r in ended), default=0.0), 3),
        route_outcomes=dict(collections.Counter(r.outcome for r in routes or [])),
        stream_seconds=seconds)
