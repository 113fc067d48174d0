"""What the broker remembers about workers and jobs. Plain records, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.prefixes import PrefixMirror
from common.messages import Ready, Submit, WorkerLoad
from common.status import Route, WorkerStatus


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

    @property
    def names(self) -> frozenset[str]:
        return frozenset((self.info.model_id, *self.info.tiers))

    @property
    def free_slots(self) -> int:
        return self.info.slots - len(self.running)

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
