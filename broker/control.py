"""CONTROL: what a broker answers (``mlx-stack mesh``, the gateway's ``/v1/models``,
``/metrics`` and dashboard), as a table of operations over the broker's state.

Read-only questions, plus the two changes ``mlx-stack mesh add`` / ``remove`` make to the
static peers. Answers are the typed records of :mod:`common.status`, sent as plain maps;
the askers decode them with :mod:`common.control`, which lists the same operations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.skew import advice
from common import messages as msgs
from common.config import ENDPOINT
from common.status import COORDINATOR, STANDBY, BrokerStatus, PeerStatus, Route, plain

if TYPE_CHECKING:
    from broker.server import Broker

ROUTES = 20
"""Routing decisions answered when ``routes`` names no valid count."""


def answer(broker: Broker, msg: msgs.Control) -> msgs.ControlReply:
    """The reply to a CONTROL question, from :data:`OPERATIONS`."""
    operation = OPERATIONS.get(msg.op)
    try:
        if operation is None:
            raise ValueError(f"unknown op {msg.op!r}")
        result = operation(broker, msg.args)
    except ValueError as exc:
        return msgs.ControlReply(
            request_id=msg.request_id, ok=False, epoch=broker.epoch,
            error=f"{exc}; use {'|'.join(OPERATIONS)} "
            "(add_peer and remove_peer with endpoint='tcp://host:port')")
    return msgs.ControlReply(request_id=msg.request_id, ok=True, result=plain(result),
                             epoch=broker.epoch)


def status(broker: Broker, _: dict[str, Any] | None = None) -> BrokerStatus:
    """The broker, its peers, workers, queues and counters."""
    now = time.monotonic()
    table = broker.table
    return BrokerStatus(
        node_id=broker.settings.node_id, endpoint=broker.advertise,
        role=COORDINATOR if broker.coordinating else STANDBY,
        coordinator=broker.advertise if broker.coordinating else broker.coordinator,
        epoch=broker.epoch, priority=broker.settings.priority,
        peers=[PeerStatus(node_id=b.node_id, endpoint=b.endpoint, coordinator=b.coordinator,
                          epoch=b.epoch, priority=b.priority,
                          last_seen_s=round(now - b.last_seen, 3))
               for b in broker.election.live(now)],
        incompatible=[PeerStatus(node_id=s.hello.node_id, endpoint=s.hello.endpoint,
                                 coordinator=s.hello.coordinator, protocol=s.hello.protocol,
                                 advice=advice(broker.settings.node_id, s.hello),
                                 last_seen_s=round(now - s.last_seen, 3))
                      for s in broker.skew.live(now)],
        alias=broker.alias(now),
        uptime_s=round(time.time() - broker.started, 1),
        workers=[w.status(now) for w in table.workers.values()],
        queues={m: len(q) for m, q in table.queues.items() if q},
        known_models=sorted({*table.known_models, *broker.mesh_models}),
        jobs=len(table.jobs), gateways=len(broker.gateways),
        counters=dict(broker.counters + table.counters),
        rejected=dict(broker.rejected + table.rejected), models=table.models())


def routes(broker: Broker, args: dict[str, Any]) -> list[Route]:
    """The last ``last`` routing decisions (default :data:`ROUTES`), oldest first."""
    last = args.get("last", ROUTES)
    last = last if isinstance(last, int) and last > 0 else ROUTES
    return list(broker.table.routes)[-last:]


def add_peer(broker: Broker, args: dict[str, Any]) -> bool:
    broker.peers.restore(peer_endpoint(args))
    return True


def remove_peer(broker: Broker, args: dict[str, Any]) -> bool:
    """Stop announcing to the peer and forget it; whether it was known at all."""
    return broker.forget_peer(peer_endpoint(args))


def peer_endpoint(args: dict[str, Any]) -> str:
    """The ``endpoint`` argument of add_peer / remove_peer, checked."""
    endpoint = args.get("endpoint")
    if not (isinstance(endpoint, str) and ENDPOINT.fullmatch(endpoint)):
        raise ValueError("bad arguments")
    return endpoint


OPERATIONS: dict[str, Callable[[Broker, dict[str, Any]], Any]] = {
    "status": status,
    "models": lambda broker, _: broker.table.models(),
    "routes": routes,
    "add_peer": add_peer,
    "remove_peer": remove_peer,
}
