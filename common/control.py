"""CONTROL questions to a broker, asked the same way by every asker.

The operations and the type of each answer are listed once (:data:`RESULTS`); a reply is
decoded into those typed records (common/status.py) or raises :class:`ControlError`.
The gateway asks over its own broker link (:meth:`gateway.client.BrokerClient.control`,
async); the ``mesh`` commands and the tests use :class:`ControlClient`, a blocking DEALER
with a timeout on every question, so that a dead broker gives an answer ("nobody there"),
not a hang.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.config import Settings
from mlx_stack.common.meshkeys import MeshKeys
from mlx_stack.common.plain import ProtocolError, from_dict
from mlx_stack.common.status import BrokerStatus, ModelEntry, Route
from mlx_stack.common.transport import configure


def _record(cls: type) -> Callable[[Any], Any]:
    return lambda value: from_dict(cls, value, depth=2)  # ControlReply.result's fields


def _records(cls: type) -> Callable[[Any], Any]:
    return lambda value: [from_dict(cls, entry, depth=3) for entry in value]


def _flag(value: Any) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


RESULTS: dict[str, Callable[[Any], Any]] = {
    "status": _record(BrokerStatus),
    "models": _records(ModelEntry),
    "routes": _records(Route),
    "add_peer": _flag,
    "remove_peer": _flag,
}
"""Each CONTROL operation, with what decodes its answer into typed records."""


class ControlError(RuntimeError):
    """The broker answered, but refused the request (unknown op, bad argument), or sent an
    answer that does not decode."""


def question(op: str, args: dict[str, Any] | None = None) -> msgs.Control:
    """A CONTROL message asking ``op``, with a fresh request id."""
    return msgs.Control(request_id=uuid.uuid4().hex, op=op, args=args or {})


def answer(op: str, reply: msgs.ControlReply) -> Any:
    """The typed result of ``reply`` to ``op``; :class:`ControlError` when refused."""
    if not reply.ok:
        raise ControlError(reply.error)
    decode = RESULTS.get(op)
    if decode is None:  # refused above: an unknown op never gets ok=True
        raise ControlError(f"unknown op {op!r}")
    try:
        return decode(reply.result)
    except (ProtocolError, TypeError, AttributeError) as exc:
        raise ControlError(f"the broker's answer to {op!r} does not decode: {exc}") from None


class ControlClient:
    """One connection to one broker for CONTROL requests."""

    def __init__(self, endpoint: str, settings: Settings, keys: MeshKeys | None,
                 ctx: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.sock = configure((ctx or zmq.Context.instance()).socket(zmq.DEALER), settings,
                              keys)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, op: str, timeout: float = 2.0, **args: Any) -> Any:
        """The typed result of CONTROL ``op``; None when the broker does not answer in
        time, :class:`ControlError` when it refuses."""
        msg = question(op, args)
        self.sock.send_multipart(wire.encode(wire.GATEWAY, msg))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self.sock.poll(left * 1000):
            try:
                _, reply = wire.decode(self.sock.recv_multipart(), wire.FROM_BROKER)
            except ProtocolError:
                continue
            if isinstance(reply, msgs.ControlReply) and reply.request_id == msg.request_id:
                return answer(op, reply)
        return None

    def close(self) -> None:
        self.sock.close(0)
