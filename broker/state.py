"""What the broker remembers about workers and jobs. Plain records, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.protocol import Ready, Submit


@dataclass(slots=True)
class WorkerState:
    """A registered worker. ``in_flight`` is the broker's OWN count of dispatched jobs,
    updated at dispatch time, so a burst never herds onto one worker between heartbeats."""

    identity: bytes
    info: Ready
    expires: float
    in_flight: set[str] = field(default_factory=set)
    mem_free: int = 0
    active: int = 0
    tokens_per_s: float = 0.0
    kv_bytes: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    last_seen: float = 0.0

    @property
    def names(self) -> frozenset[str]:
        return frozenset((self.info.model_id, *self.info.aliases))

    @property
    def free_slots(self) -> int:
        return self.info.slots - len(self.in_flight)

    def summary(self, now: float) -> dict[str, Any]:
        """The worker as CONTROL replies show it."""
        return {
            "worker_id": self.info.worker_id,
            "node_id": self.info.node_id,
            "model_id": self.info.model_id,
            "aliases": list(self.info.aliases),
            "engine": self.info.engine,
            "slots": self.info.slots,
            "in_flight": len(self.in_flight),
            "active": self.active,
            "mem_total": self.info.mem_total,
            "mem_free": self.mem_free,
            "model_bytes": self.info.model_bytes,
            "tokens_per_s": self.tokens_per_s,
            "kv_bytes": self.kv_bytes,
            "counters": dict(self.counters),
            "last_heartbeat_s": round(now - self.last_seen, 3),
        }


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
    tokens: int = 0
    retries: int = 0
    route: dict[str, Any] = field(default_factory=dict)
