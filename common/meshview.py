"""The mesh at a glance, from a broker's CONTROL status: who coordinates, each node with
its role, models, slots, memory and last heartbeat, each model with its queue, each tier
with the model it resolves to. One place
for these views, so that ``mlx-stack mesh`` and the ``/mesh`` dashboard show the same.
The views are plain maps, ready for JSON (``--json`` and the dashboard)."""

from __future__ import annotations

from typing import Any

from common.status import COORDINATOR, STANDBY, BrokerStatus, WorkerStatus


def incompatible_role(protocol: int) -> str:
    """The role shown for a node whose broker speaks another protocol version."""
    return f"incompatible (protocol {protocol})"


def coordinator(status: BrokerStatus) -> dict[str, Any]:
    """Which broker coordinates, as the broker in use sees it."""
    if status.coordinating:
        node = status.node_id
    else:
        node = next((b.node_id for b in status.peers if b.endpoint == status.coordinator), None)
    return {"node_id": node, "endpoint": status.coordinator, "epoch": status.epoch,
            "alias": status.alias}


def nodes(status: BrokerStatus) -> list[dict[str, Any]]:
    """One entry per node that runs a live broker or worker: its broker's role, models
    (with their queue depth), slots in use / total, memory and last heartbeat age. A node
    whose broker speaks another protocol version has the role ``incompatible (protocol
    N)`` and, in ``advice``, which Mac to upgrade (its workers serve its own mesh)."""
    roles = {status.node_id: (status.role, 0.0)}
    advice: dict[str, str] = {}
    for peer in status.incompatible:
        roles[peer.node_id] = (incompatible_role(peer.protocol), peer.last_seen_s)
        advice[peer.node_id] = peer.advice
    for peer in status.peers:
        roles[peer.node_id] = (COORDINATOR if peer.coordinator else STANDBY, peer.last_seen_s)
    workers: dict[str, list[WorkerStatus]] = {}
    for worker in status.workers:
        workers.setdefault(worker.node_id, []).append(worker)
    view = []
    for node in sorted(roles.keys() | workers.keys()):
        mine = workers.get(node, [])
        role, broker_age = roles.get(node, ("worker", None))
        ages = [w.last_heartbeat_s for w in mine] + ([broker_age] if role != "worker" else [])
        models = {w.model_id: {
            "model_id": w.model_id, "tiers": w.tiers, "engine": w.engine,
            "queue": sum(status.queues.get(n, 0) for n in w.names)}
            for w in mine}
        # Every worker of a node reports the same machine: the latest report will do.
        latest = min(mine, key=lambda w: w.last_heartbeat_s, default=None)
        view.append({
            "node_id": node,
            "role": role,
            "workers": len(mine),
            "models": [models[m] for m in sorted(models)],
            "slots_in_use": sum(w.running for w in mine),
            "slots_total": sum(w.slots for w in mine),
            "mem_total": latest.mem_total if latest else 0,
            "mem_free": latest.mem_free if latest else 0,
            "heartbeat_age_s": min(ages) if ages else None,
            "advice": advice.get(node, ""),
        })
    return view


def models(status: BrokerStatus) -> list[dict[str, Any]]:
    """One entry per model: its engine, workers, slots in use / total, context length and
    jobs queued (for the model or a name that resolves to it)."""
    view: dict[str, dict[str, Any]] = {}
    names = {e.id: e for e in status.models}

    def entry(model: str, engine: str = "") -> dict[str, Any]:
        known = names.get(model)
        return view.setdefault(model, {
            "model": model, "engine": engine, "workers": 0, "slots_in_use": 0,
            "slots_total": 0, "context_length": known.context_length if known else 0,
            "queued": 0})

    for w in status.workers:
        row = entry(w.model_id, w.engine)
        row["workers"] += 1
        row["slots_in_use"] += w.running
        row["slots_total"] += w.slots
    for name, depth in status.queues.items():
        entry(names[name].model_id if name in names else name)["queued"] += depth
    return sorted(view.values(), key=lambda r: r["model"])


def tiers(status: BrokerStatus) -> list[dict[str, Any]]:
    """One entry per tier (and per ambiguous name): the model it resolves to, that model's
    nodes and workers serving it, the requests queued for it, and, when workers of several
    models serve it, all of them (only ``model`` gets its requests)."""
    return [{"tier": e.id, "model": e.model_id, "nodes": e.nodes, "workers": e.workers,
             "queued": e.queued, "ambiguous": e.ambiguous}
            for e in status.models if e.is_tier or e.ambiguous]
