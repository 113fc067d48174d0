"""What the broker remembers about workers, gateways and jobs. Plain records, no I/O."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from mlx_stack.broker.prefixes import MISS_TOKENS, PrefixMirror
from mlx_stack.common.messages import Ready, Release, Submit, WorkerLoad
from mlx_stack.common.status import Candidate, Route, WorkerStatus


@dataclass(slots=True)
class WorkerState:
    """A registered worker. ``running`` holds the jobs the broker dispatched to it (its OWN count),
    updated at dispatch time, so a burst never herds onto one worker between heartbeats."""

    identity: bytes
    info: Ready
    expires: float
    load: WorkerLoad
    """Its last report, kept as it came (READY's, then each HEARTBEAT's)."""
    running: set[str] = field(default_factory=set)
    last_seen: float = 0.0
    prefixes: PrefixMirror = field(default_factory=PrefixMirror)
    """What its prompt cache probably holds, from the jobs it finished."""
    released_since_beat: set[str] = field(default_factory=set)
    """Jobs whose RELEASE came since its last heartbeat: that heartbeat's count of cache
    entries may predate theirs (a job ended by a stop sequence is released before its
    sequence leaves the engine, which stores its cache then)."""

    @property
    def names(self) -> frozenset[str]:
        return frozenset((self.info.model_id, *self.info.tiers))

    @property
    def free_slots(self) -> int:
        return self.info.slots - len(self.running)

    def report(self, load: WorkerLoad) -> int:
        """Its HEARTBEAT's load: kept, and its prompt cache's size applied to what the
        broker thinks that cache holds. Returns the chains that dropped."""
        dropped = self.prefixes.trim(load.cache_entries,
                                     self.running | self.released_since_beat)
        self.released_since_beat.clear()
        self.load = load
        return dropped

    def status(self, now: float) -> WorkerStatus:
        """The worker as CONTROL ``status`` shows it."""
        info = self.info
        return WorkerStatus(
            worker_id=info.worker_id, node_id=info.node_id, model_id=info.model_id,
            tiers=list(info.tiers), engine=info.engine, slots=info.slots,
            context_length=info.context_length,
            mem_total=info.mem_total, model_bytes=info.model_bytes,
            running=len(self.running), load=self.load,
            last_heartbeat_s=round(now - self.last_seen, 3))


@dataclass(slots=True)
class JobState:
    """A job from SUBMIT until its FINAL/FAIL reaches the gateway.

    ``gateway`` is None once the gateway cancelled: the job then only waits for its
    worker to confirm, so the slot is freed when the worker really stops.
    """

    submit: Submit
    gateway: bytes | None
    deadline: float
    enqueued: float
    worker: bytes | None = None
    dispatch_id: str = ""
    streamed: bool = False
    """Whether any output reached the gateway: then only the gateway may resume it."""
    retries: int = 0
    route: Route | None = None
    """Its entry in the route log, made at its first dispatch."""

    def cache_served(self, worker: WorkerState, release: Release) -> int:
        """``worker``'s RELEASE ended the job: the route log records what its prompt
        cache served, and a match the route counted on that the cache did not serve
        corrects the worker's mirror (:meth:`PrefixMirror.missed`). Returns the chains
        that dropped."""
        worker.released_since_beat.add(self.submit.job_id)
        worker.prefixes.ended(self.submit.job_id)
        route = self.route
        if route is None:
            return 0
        route.reused = release.prompt_tokens_reused
        route.computed = release.prompt_tokens_computed
        predicted = next((c.cached for c in route.candidates
                          if c.worker_id == worker.info.worker_id), 0)
        if predicted and release.prompt_tokens_reused < MISS_TOKENS:
            return worker.prefixes.missed(self.submit.prefix_hashes, self.submit.job_id,
                                          worker.running)
        return 0

    def route_to(self, worker: WorkerState, scored: list[tuple[WorkerState, float, int]],
                 now: float, wall: float) -> Route:
        """Its route log entry as it is dispatched to ``worker`` (chosen among ``scored``:
        each candidate, its score and cached characters) at ``now``, which is ``wall``
        on the wall clock; made at the first dispatch, updated at each."""
        if self.route is None:
            self.route = Route(job_id=self.submit.job_id, request_id=self.submit.request_id,
                               model=self.submit.model, time=wall)
        route = self.route
        route.retries = self.retries
        route.candidates = [Candidate(worker_id=w.info.worker_id, node_id=w.info.node_id,
                                      score=round(s, 4), cached=c) for w, s, c in scored]
        route.worker_id, route.node_id = worker.info.worker_id, worker.info.node_id
        route.queue_wait_ms = round((now - self.enqueued) * 1000, 2)
        return route


MAX_DROPPED = 10_000
"""Most gateways remembered as having had their jobs dropped (a flood of identities clears
the set: such a gateway then learns of it from its own timeouts)."""


class Gateways:
    """The live gateways, each with when it expires (monotonic seconds), and those whose
    jobs were dropped while they were silent (they must be told to resubmit them)."""

    def __init__(self) -> None:
        self.expires: dict[bytes, float] = {}
        self.dropped: set[bytes] = set()

    def __contains__(self, identity: object) -> bool:
        return identity in self.expires

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self.expires))

    def __len__(self) -> int:
        return len(self.expires)

    def heard(self, identity: bytes, expires: float) -> tuple[bool, bool]:
        """A gateway spoke: it is live until ``expires``. Whether it is new, and whether
        it must be told that its jobs were dropped (once)."""
        new = identity not in self.expires
        self.expires[identity] = expires
        if identity in self.dropped:
            self.dropped.discard(identity)
            return new, True
        return new, False

    def silent(self, now: float) -> list[bytes]:
        """The gateways that expired before ``now``."""
        return [g for g, expires in self.expires.items() if expires < now]

    def remove(self, identity: bytes, dropped: bool) -> None:
        """Forget a gateway; ``dropped``: its jobs were dropped (remembered, see
        :meth:`heard`)."""
        self.expires.pop(identity, None)
        if dropped:
            if len(self.dropped) >= MAX_DROPPED:
                self.dropped.clear()
            self.dropped.add(identity)

    def clear(self) -> None:
        self.expires.clear()


@dataclass(slots=True)
class Released:
    """A job its worker's RELEASE ended, remembered for
    :data:`~common.messages.RELEASED_WATCH_S`: its FINAL went straight to the gateway (the
    job's way), and may still be lost with the connection it took (queued there behind a
    slow link), or with the worker killed before its last frames left. A FAIL of the
    worker (the stream to the gateway dropped) or the worker's purge within that time
    reaches the gateway, which resumes the job unless its FINAL did arrive."""

    worker: bytes
    gateway: bytes
    until: float
