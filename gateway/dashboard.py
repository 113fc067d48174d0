"""The live mesh dashboard: ``GET /mesh`` (one static page) and ``GET /mesh/status`` (JSON).

The page is a single HTML file with its script and style inline (no build step, no CDN):
it polls ``/mesh/status`` every second. The grouping by node is done here, in Python, so
that the page only renders and the figures are the same ones tests and tools can read.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway.client import BrokerClient, JobError

PAGE = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'")
"""The page loads nothing from anywhere and talks only to this gateway."""
ROUTES = 20
"""Recent routing decisions shown."""
TIMEOUT = 1.0
"""Seconds to wait for the broker; the page polls again a second later anyway."""


async def snapshot(client: BrokerClient) -> dict[str, Any]:
    """The coordinator, nodes, queues and recent routes, from the broker in use."""
    view: dict[str, Any] = {"gateway": {"node_id": client.settings.node_id,
                                        "broker": client.broker.current},
                            "up": False, "error": None, "coordinator": None, "nodes": [],
                            "queues": {}, "routes": [], "broker": None}
    try:
        status, routes = await asyncio.gather(
            client.control("status", timeout=TIMEOUT),
            client.control("routes", {"last": ROUTES}, timeout=TIMEOUT))
    except JobError as exc:
        view["error"] = exc.message
        return view
    view.update(up=True, coordinator=coordinator(status), nodes=nodes(status),
                queues=status["queues"], routes=routes[::-1], broker=status)
    return view


def coordinator(status: dict[str, Any]) -> dict[str, Any]:
    """Which broker coordinates, as the broker in use sees it."""
    if status["role"] == "active":
        node = status["node_id"]
    else:
        node = next((b["node_id"] for b in status["peers"]
                     if b["endpoint"] == status["leader"]), None)
    return {"node_id": node, "endpoint": status["leader"], "epoch": status["epoch"]}


def nodes(status: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per node that runs a live broker or worker: its broker's role, models
    (with their queue depth), slots in use / total, memory and last heartbeat age."""
    roles = {status["node_id"]: ("coordinator" if status["role"] == "active" else "standby",
                                 0.0)}
    for peer in status["peers"]:
        roles[peer["node_id"]] = ("coordinator" if peer["active"] else "standby",
                                  peer["last_seen_s"])
    workers: dict[str, list[dict[str, Any]]] = {}
    for worker in status["workers"]:
        workers.setdefault(worker["node_id"], []).append(worker)
    queues = status["queues"]
    view = []
    for node in sorted(roles.keys() | workers.keys()):
        mine = workers.get(node, [])
        role, broker_age = roles.get(node, ("worker", None))
        ages = [w["last_heartbeat_s"] for w in mine] + ([broker_age] if role != "worker" else [])
        models = {w["model_id"]: {
            "model_id": w["model_id"], "aliases": w["aliases"], "engine": w["engine"],
            "queue": sum(queues.get(n, 0) for n in (w["model_id"], *w["aliases"]))}
            for w in mine}
        # Every worker of a node reports the same machine: the latest report will do.
        latest = min(mine, key=lambda w: w["last_heartbeat_s"], default=None)
        view.append({
            "node_id": node,
            "role": role,
            "workers": len(mine),
            "models": [models[m] for m in sorted(models)],
            "slots_in_use": sum(w["in_flight"] for w in mine),
            "slots_total": sum(w["slots"] for w in mine),
            "mem_total": latest["mem_total"] if latest else 0,
            "mem_free": latest["mem_free"] if latest else 0,
            "heartbeat_age_s": min(ages) if ages else None,
        })
    return view
