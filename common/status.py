"""What a broker reports over CONTROL, as typed records.

The broker builds these, sends them as plain maps (:func:`plain`), and every reader (the
``mlx-stack mesh`` commands, the gateway's ``/metrics``, ``/v1/models`` and dashboard,
the tests) decodes them with :func:`common.plain.from_dict`, checked field by field like
every message on the wire. A field renamed here is renamed for all of them at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlx_stack.common.messages import WorkerLoad

COORDINATOR = "coordinator"
STANDBY = "standby"
"""The two roles of a broker."""


@dataclass(kw_only=True, slots=True)
class WorkerStatus:
    """A registered worker, as its broker sees it."""

    worker_id: str
    node_id: str
    model_id: str
    tiers: list[str] = field(default_factory=list)
    engine: str = "mlx"
    slots: int = 1
    context_length: int = 0
    mem_total: int = 0
    model_bytes: int = 0
    running: int = 0
    """Jobs the broker dispatched to it that have not ended: the broker's own count, which
    routing uses, updated at dispatch time rather than at the next heartbeat (the
    worker's own is ``load.running``: they differ while a JOB or FINAL is on the wire)."""
    load: WorkerLoad = field(default_factory=WorkerLoad)
    """What the worker last reported of its load, as it sent it."""
    last_heartbeat_s: float = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a request may use for this worker's model."""
        return (self.model_id, *self.tiers)

    @property
    def state(self) -> str:
        """idle (no job), busy (jobs and a free slot) or full (every slot in use)."""
        if self.running == 0:
            return "idle"
        return "full" if self.running >= self.slots else "busy"


WORKER_STATES = ("idle", "busy", "full")


@dataclass(kw_only=True, slots=True)
class PeerStatus:
    """Another broker heard from recently."""

    node_id: str
    endpoint: str
    coordinator: bool = False
    epoch: int = 0
    priority: int = 0
    last_seen_s: float = 0.0
    protocol: int = 0
    """The peer's mesh protocol version when it is not this broker's (the peer is then in
    :attr:`BrokerStatus.incompatible`); 0 for a peer of the same version."""
    advice: str = ""
    """For an incompatible peer: which Mac to upgrade to what (shown as is)."""

    @property
    def incompatible(self) -> bool:
        return self.protocol != 0


@dataclass(kw_only=True, slots=True)
class BrokerStatus:
    """The answer to CONTROL ``status``: one broker, its peers and what it serves."""

    node_id: str
    endpoint: str
    role: str
    """:data:`COORDINATOR` or :data:`STANDBY`."""
    coordinator: str
    """Endpoint of the coordinator this broker knows (its own when it coordinates, "" when
    a standby knows none yet)."""
    epoch: int
    priority: int = 0
    peers: list[PeerStatus] = field(default_factory=list)
    """The live peers of this broker's protocol version: its election."""
    incompatible: list[PeerStatus] = field(default_factory=list)
    """Live brokers of another protocol version (``protocol`` and ``advice`` set): they
    never join the election; upgrade one side."""
    alias: bool = False
    """Whether this broker publishes (or, with mDNS off, would publish) mlx-stack.local:
    it coordinates and no coordinator of a newer protocol is live."""
    uptime_s: float = 0.0
    workers: list[WorkerStatus] = field(default_factory=list)
    queues: dict[str, int] = field(default_factory=dict)
    """Jobs waiting for a free slot, by requested model name (empty queues left out)."""
    known_models: list[str] = field(default_factory=list)
    """Names a request waits for (the grace period) rather than a 404, were this broker
    to coordinate: served lately, this node's expected models, and a standby's
    coordinator's announced ones."""
    jobs: int = 0
    gateways: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    """Frames dropped, by reason (common/plain.py's and the broker's own)."""
    models: list[ModelEntry] = field(default_factory=list)
    """Every name a request may use and the model it resolves to (a standby, which
    serves nobody, has none)."""

    @property
    def coordinating(self) -> bool:
        return self.role == COORDINATOR


@dataclass(kw_only=True, slots=True)
class Candidate:
    """A worker that could take a job, with its routing score (lower wins)."""

    worker_id: str
    node_id: str
    score: float
    cached: int = 0
    """Characters of the job's prompt the worker's prompt cache probably holds (from the
    chains of the jobs it was given; 0 below the minimum that routing weighs)."""


@dataclass(kw_only=True, slots=True)
class Route:
    """One routing decision of the coordinator, for ``mlx-stack mesh routes``."""

    job_id: str
    request_id: str = ""
    model: str
    outcome: str = "running"
    """``running``, then ``ok`` (the worker's FINAL), ``failed`` (its FAIL), ``cancelled``,
    ``worker_lost``, or the error code of the broker's own FAIL (``deadline_exceeded``,
    ``no_worker``)."""
    retries: int = 0
    time: float = 0.0
    """Wall-clock time of the first dispatch (seconds since the epoch)."""
    worker_id: str = ""
    node_id: str = ""
    queue_wait_ms: float = 0.0
    candidates: list[Candidate] = field(default_factory=list)
    reused: int = 0
    """Prompt tokens the chosen worker's prompt cache served (its RELEASE says, once the
    job went well): what the candidate's ``cached`` predicted."""
    computed: int = 0
    """Prompt tokens the chosen worker prefilled."""


@dataclass(kw_only=True, slots=True)
class ModelEntry:
    """A name a request may use (a model id or a tier) and the model it resolves to."""

    id: str
    model_id: str
    """The model that answers requests for ``id``: for a model's own id, itself."""
    engine: str = "mlx"
    workers: int = 0
    """Live workers of ``model_id`` that serve the name."""
    nodes: list[str] = field(default_factory=list)
    """The nodes of those workers."""
    tiers: list[str] = field(default_factory=list)
    """For a model's own id: the tiers that resolve to it."""
    context_length: int = 0
    """Tokens ``model_id`` attends to, prompt and answer together (0: not said)."""
    queued: int = 0
    """Requests for the name waiting for a free slot."""
    ambiguous: list[str] = field(default_factory=list)
    """Every model that serves the name when more than one does (then only ``model_id``
    gets its requests; the others should take another tier); empty otherwise."""

    @property
    def is_tier(self) -> bool:
        return self.id != self.model_id


def plain(record: Any) -> Any:
    """A record, or a list of records, as the plain maps a CONTROL reply carries."""
    if isinstance(record, list):
        return [plain(r) for r in record]
    return dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record
