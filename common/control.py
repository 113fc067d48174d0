"""Asking a broker CONTROL questions from outside the mesh's roles: the ``mesh`` commands
and the tests. A blocking DEALER that speaks the gateway protocol, with a timeout on every
question so that a dead broker gives an answer ("nobody there"), not a hang."""

from __future__ import annotations

import time
import uuid
from typing import Any

import zmq

from common import protocol as p
from common.config import Settings
from common.meshkeys import MeshKeys
from common.transport import configure


class ControlError(RuntimeError):
    """The broker answered, but refused the request (unknown op, bad argument)."""


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
        """The result of CONTROL ``op``; None when the broker does not answer in time,
        :class:`ControlError` when it refuses."""
        request_id = uuid.uuid4().hex
        self.sock.send_multipart(p.encode(p.GATEWAY, p.Control(
            request_id=request_id, op=op, args=args)))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self.sock.poll(left * 1000):
            try:
                _, msg = p.decode(self.sock.recv_multipart(), p.FROM_BROKER)
            except p.ProtocolError:
                continue
            if isinstance(msg, p.ControlReply) and msg.request_id == request_id:
                if not msg.ok:
                    raise ControlError(msg.error)
                return msg.result
        return None

    def close(self) -> None:
        self.sock.close(0)
