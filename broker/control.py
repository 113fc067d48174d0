"""CONTROL: what a broker answers (``mlx-stack mesh``, the gateway's ``/v1/models``,
``/metrics`` and dashboard), as a table of operations over a snapshot of the broker.

Read-only questions are answered from a :class:`Snapshot` the broker takes when the
question arrives; the two changes ``mlx-stack mesh add`` / ``remove`` make to the static
peers are the broker's to make (:class:`PeerEdits`). Answers are the typed records of
:mod:`common.status`, sent as plain maps; the askers decode them with
:mod:`common.control`, which lists the same operations. Nothing here reads the broker
itself, so this module imports nothing of broker/server.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mlx_stack.common import messages as msgs
from mlx_stack.common.config import ENDPOINT
from mlx_stack.common.status import BrokerStatus, Route, plain

ROUTES = 20
"""Routing decisions answered when ``routes`` names no valid count."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The broker as CONTROL reads it, taken when a question arrives."""

    status: BrokerStatus
    routes: list[Route]
    """The route log, oldest first."""


class PeerEdits(Protocol):
    """The changes CONTROL may ask of a broker: its static peers."""

    def add_peer(self, endpoint: str) -> bool:
        """Announce to ``endpoint`` again (after a remove, or for the first time)."""
        ...

    def remove_peer(self, endpoint: str) -> bool:
        """Stop announcing to the peer and forget it; whether it was known at all."""
        ...


def answer(msg: msgs.Control, snapshot: Snapshot, edits: PeerEdits) -> msgs.ControlReply:
    """The reply to a CONTROL question, from :data:`OPERATIONS`."""
    operation = OPERATIONS.get(msg.op)
    epoch = snapshot.status.epoch
    try:
        if operation is None:
            raise ValueError(f"unknown op {msg.op!r}")
        result = operation(snapshot, edits, msg.args)
    except ValueError as exc:
        return msgs.ControlReply(
            request_id=msg.request_id, ok=False, epoch=epoch,
            error=f"{exc}; use {'|'.join(OPERATIONS)} "
            "(add_peer and remove_peer with endpoint='tcp://host:port')")
    return msgs.ControlReply(request_id=msg.request_id, ok=True, result=plain(result),
                             epoch=epoch)


def routes(snapshot: Snapshot, args: dict[str, Any]) -> list[Route]:
    """The last ``last`` routing decisions (default :data:`ROUTES`), oldest first."""
    last = args.get("last", ROUTES)
    last = last if isinstance(last, int) and last > 0 else ROUTES
    return snapshot.routes[-last:]


def peer_endpoint(args: dict[str, Any]) -> str:
    """The ``endpoint`` argument of add_peer / remove_peer, checked."""
    endpoint = args.get("endpoint")
    if not (isinstance(endpoint, str) and ENDPOINT.fullmatch(endpoint)):
        raise ValueError("bad arguments")
    return endpoint


Operation = Callable[[Snapshot, PeerEdits, dict[str, Any]], Any]
OPERATIONS: dict[str, Operation] = {
    "status": lambda snapshot, _, __: snapshot.status,
    "models": lambda snapshot, _, __: snapshot.status.models,
    "routes": lambda snapshot, _, args: routes(snapshot, args),
    "add_peer": lambda _, edits, args: edits.add_peer(peer_endpoint(args)),
    "remove_peer": lambda _, edits, args: edits.remove_peer(peer_endpoint(args)),
}
