"""The mesh at a glance, from a broker's CONTROL status: who coordinates, each node with
its role, models, slots, memory and last heartbeat, each model with its queue, each tier
with the model it resolves to; and, from successive statuses, what changed (workers and
nodes lost or joined, a new coordinator) and which nodes were in the mesh lately but are
not now. One place for these views, so that ``mlx-stack mesh`` (``status --watch``) and
the ``/mesh`` dashboard show the same. The views are typed records (dataclasses) that the
command line reads by attribute; ``--json`` and the dashboard send them as plain maps
(:func:`common.status.plain`), with their fields as keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlx_stack.common.status import COORDINATOR, STANDBY, BrokerStatus, WorkerStatus


def incompatible_role(protocol: int) -> str:
    """The role shown for a node whose broker speaks another protocol version."""
    return f"incompatible (protocol {protocol})"


@dataclass(kw_only=True, slots=True)
class CoordinatorView:
    """Which broker coordinates, as the broker in use sees it."""

    node_id: str | None
    """None when the broker in use does not know the coordinator's node."""
    endpoint: str
    epoch: int
    alias: bool


def coordinator(status: BrokerStatus) -> CoordinatorView:
    """Which broker coordinates, as the broker in use sees it."""
    if status.coordinating:
        node = status.node_id
    else:
        node = next((b.node_id for b in status.peers if b.endpoint == status.coordinator), None)
    return CoordinatorView(node_id=node, endpoint=status.coordinator, epoch=status.epoch,
                           alias=status.alias)


@dataclass(kw_only=True, slots=True)
class LoadView:
    """What some workers do together (see :func:`load`)."""

    workers: int = 0
    slots_in_use: int = 0
    slots_total: int = 0
    tokens_per_s: float = 0.0
    cache_hit_rate: float | None = None
    """The share of their requests whose prompt began with a cached prefix (None before
    any request)."""


@dataclass(kw_only=True, slots=True)
class ModelOnNode(LoadView):
    """One model on one node: its workers there and the requests queued for it."""

    model_id: str
    tiers: list[str] = field(default_factory=list)
    engine: str = "mlx"
    queue: int = 0
    """Requests queued for the model or one of its tiers (mesh-wide)."""


@dataclass(kw_only=True, slots=True)
class NodeView(LoadView):
    """One node: its broker's role, its models and what its workers do together."""

    node_id: str
    role: str
    """coordinator, standby, worker (a node with workers and no live broker) or
    ``incompatible (protocol N)``."""
    models: list[ModelOnNode] = field(default_factory=list)
    mem_total: int = 0
    mem_free: int = 0
    heartbeat_age_s: float | None = None
    """Seconds since the freshest heartbeat of its broker or workers."""
    advice: str = ""
    """For a node of another protocol version: which Mac to upgrade to what."""
    protocol: int | None = None
    """That node's protocol version, when it is not ours."""


def nodes(status: BrokerStatus) -> list[NodeView]:
    """One entry per node that runs a live broker or worker: its broker's role, models
    (each with its queue depth, workers, slots, tokens/s and prompt-cache hit rate), slots
    in use / total, memory, tokens/s, prompt-cache hit rate and last heartbeat age. A node
    whose broker speaks another protocol version has the role ``incompatible (protocol
    N)``, its ``protocol`` and, in ``advice``, which Mac to upgrade (its workers serve its
    own mesh)."""
    roles: dict[str, tuple[str, float | None, int | None]] = {
        status.node_id: (status.role, 0.0, None)}
    advice: dict[str, str] = {}
    for peer in status.incompatible:
        roles[peer.node_id] = (incompatible_role(peer.protocol), peer.last_seen_s,
                               peer.protocol)
        advice[peer.node_id] = peer.advice
    for peer in status.peers:
        roles[peer.node_id] = (COORDINATOR if peer.coordinator else STANDBY, peer.last_seen_s,
                               None)
    workers: dict[str, list[WorkerStatus]] = {}
    for worker in status.workers:
        workers.setdefault(worker.node_id, []).append(worker)
    view = []
    for node in sorted(roles.keys() | workers.keys()):
        mine = workers.get(node, [])
        role, broker_age, protocol = roles.get(node, ("worker", None, None))
        ages = [w.last_heartbeat_s for w in mine] + ([broker_age] if role != "worker" else [])
        by_model: dict[str, list[WorkerStatus]] = {}
        for w in mine:
            by_model.setdefault(w.model_id, []).append(w)
        # Every worker of a node reports the same machine: the latest report will do.
        latest = min(mine, key=lambda w: w.last_heartbeat_s, default=None)
        view.append(NodeView(
            node_id=node, role=role,
            models=[ModelOnNode(model_id=model, tiers=ws[0].tiers, engine=ws[0].engine,
                                queue=sum(status.queues.get(n, 0) for n in ws[0].names),
                                **load(ws))
                    for model, ws in sorted(by_model.items())],
            mem_total=latest.mem_total if latest else 0,
            mem_free=latest.load.mem_free if latest else 0,
            heartbeat_age_s=min(ages) if ages else None,
            advice=advice.get(node, ""), protocol=protocol, **load(mine)))
    return view


def load(workers: list[WorkerStatus]) -> dict[str, int | float | None]:
    """The fields of a :class:`LoadView` for ``workers``: slots in use / total, tokens/s,
    and the share of their requests whose prompt began with a cached prefix."""
    hits = sum(w.load.counters.get("prompt_cache_hits", 0) for w in workers)
    misses = sum(w.load.counters.get("prompt_cache_misses", 0) for w in workers)
    return {"workers": len(workers),
            "slots_in_use": sum(w.running for w in workers),
            "slots_total": sum(w.slots for w in workers),
            "tokens_per_s": round(sum(w.load.tokens_per_s for w in workers), 2),
            "cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None}


@dataclass(kw_only=True, slots=True)
class ModelView:
    """One model mesh-wide: its workers, slots, context length and queued requests."""

    model: str
    engine: str = ""
    workers: int = 0
    slots_in_use: int = 0
    slots_total: int = 0
    context_length: int = 0
    queued: int = 0
    """Requests queued for the model or a name that resolves to it."""


def models(status: BrokerStatus) -> list[ModelView]:
    """One entry per model: its engine, workers, slots in use / total, context length and
    jobs queued (for the model or a name that resolves to it)."""
    view: dict[str, ModelView] = {}
    names = {e.id: e for e in status.models}

    def entry(model: str, engine: str = "") -> ModelView:
        known = names.get(model)
        return view.setdefault(model, ModelView(
            model=model, engine=engine, context_length=known.context_length if known else 0))

    for w in status.workers:
        row = entry(w.model_id, w.engine)
        row.workers += 1
        row.slots_in_use += w.running
        row.slots_total += w.slots
    for name, depth in status.queues.items():
        entry(names[name].model_id if name in names else name).queued += depth
    return sorted(view.values(), key=lambda r: r.model)


@dataclass(kw_only=True, slots=True)
class TierView:
    """A tier (or an ambiguous name) and the model it resolves to."""

    tier: str
    model: str
    nodes: list[str] = field(default_factory=list)
    workers: int = 0
    queued: int = 0
    ambiguous: list[str] = field(default_factory=list)
    """Every model that serves the name when several do (only ``model`` gets its
    requests); empty otherwise."""


def tiers(status: BrokerStatus) -> list[TierView]:
    """One entry per tier (and per ambiguous name): the model it resolves to, that model's
    nodes and workers serving it, the requests queued for it, and, when workers of several
    models serve it, all of them (only ``model`` gets its requests)."""
    return [TierView(tier=e.id, model=e.model_id, nodes=e.nodes, workers=e.workers,
                     queued=e.queued, ambiguous=e.ambiguous)
            for e in status.models if e.is_tier or e.ambiguous]


WORKER_LOST, WORKER_JOINED = "worker_lost", "worker_joined"
NODE_LOST, NODE_JOINED = "node_lost", "node_joined"
COORDINATOR_CHANGE = "coordinator_change"
BROKER_DOWN, BROKER_UP = "broker_down", "broker_up"
"""The kinds of event :class:`Changes` reports (the gateway adds its failovers)."""


@dataclass(kw_only=True, slots=True)
class Event:
    """One event for a time axis: wall-clock ``time``, its kind, what happened in words."""

    time: float
    kind: str
    text: str


def event(when: float, kind: str, text: str) -> Event:
    """The event ``kind`` at wall-clock ``when`` (rounded to the millisecond)."""
    return Event(time=round(when, 3), kind=kind, text=text)


@dataclass(kw_only=True, slots=True)
class Unreachable:
    """A node seen lately that the mesh does not show now."""

    node_id: str
    role: str
    """Its role when it was last seen."""
    last_seen: float
    """Wall-clock time it was last seen."""


class Changes:
    """Successive statuses of one mesh, remembered just enough to say what changed between
    them and which nodes were seen within ``forget_after_s`` but are not in the mesh now
    (unreachable: their broker stopped answering its peers, or their last worker left)."""

    def __init__(self, forget_after_s: float = 900.0) -> None:
        self.forget_after_s = forget_after_s
        self.last: BrokerStatus | None = None
        self.up: bool | None = None
        self.seen: dict[str, tuple[float, str]] = {}
        """Node -> (wall-clock time last seen, its role then)."""

    def update(self, status: BrokerStatus | None, now: float,
               error: str = "") -> list[Event]:
        """Take the status as of ``now`` (None: the broker did not answer, ``error`` says
        why); return the events since the last one taken."""
        events: list[Event] = []
        if status is None:
            if self.up:
                events.append(event(now, BROKER_DOWN, f"the broker did not answer: {error}"))
            self.up = False
            return events
        if self.up is False:
            events.append(event(now, BROKER_UP, "the broker answers again"))
        self.up = True
        if self.last is not None:
            events += differences(self.last, status, now)
        self.last = status
        for node in nodes(status):
            self.seen[node.node_id] = (now, node.role)
        for node, (when, _) in list(self.seen.items()):
            if now - when > self.forget_after_s:
                del self.seen[node]
        return events

    def unreachable(self, status: BrokerStatus | None) -> list[Unreachable]:
        """The nodes seen lately that ``status`` does not show, with when they were last
        seen (none when there is no status: then nothing is known)."""
        if status is None:
            return []
        live = {n.node_id for n in nodes(status)}
        return [Unreachable(node_id=node, role=role, last_seen=round(when, 3))
                for node, (when, role) in sorted(self.seen.items()) if node not in live]


def differences(before: BrokerStatus, after: BrokerStatus, now: float) -> list[Event]:
    """The events between two statuses: a new coordinator, workers and nodes lost or
    joined."""
    events = []
    old, new = coordinator(before), coordinator(after)
    if (old.node_id, old.epoch) != (new.node_id, new.epoch):
        events.append(event(now, COORDINATOR_CHANGE,
                            f"coordinator {old.node_id or '?'} (epoch {old.epoch}) "
                            f"-> {new.node_id or '?'} (epoch {new.epoch})"))
    was = {w.worker_id: w for w in before.workers}
    now_in = {w.worker_id: w for w in after.workers}
    for kind, ids, source, verb in ((WORKER_LOST, was.keys() - now_in.keys(), was, "left"),
                                    (WORKER_JOINED, now_in.keys() - was.keys(), now_in,
                                     "joined")):
        for worker_id in sorted(ids):
            w = source[worker_id]
            events.append(event(now, kind, f"worker {worker_id} ({w.model_id}) on node "
                                f"{w.node_id} {verb} the mesh"))
    old_nodes = {n.node_id for n in nodes(before)}
    new_nodes = {n.node_id for n in nodes(after)}
    events += [event(now, NODE_LOST, f"node {n} left the mesh (unreachable)")
               for n in sorted(old_nodes - new_nodes)]
    events += [event(now, NODE_JOINED, f"node {n} joined the mesh")
               for n in sorted(new_nodes - old_nodes)]
    return events
