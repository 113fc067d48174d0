"""The gateway's stream socket: where workers send a job's output straight to it.

Every SUBMIT names this socket's endpoint (``reply_to``); a worker that can reach it
sends the job's frames (ACCEPTED, PARTIALs, FINAL) here rather than through the broker,
which saves every token a hop through one more process (worker/ways.py). The socket is a
ROUTER, the mesh's kind of server socket: with a mesh secret it speaks CURVE and admits
members only, like a broker's. It binds where this node's broker binds (the network the
workers are on), on ``stream_port`` or any free port, and is advertised at the broker's
advertised host.

Nothing received is trusted: frames are decoded against :data:`common.wire.TO_GATEWAY`
and whatever fails is dropped (and logged at debug level). Which frames belong to which
job attempt is the inbox's business (gateway/inbox.py).
"""

from __future__ import annotations

import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.config import Settings, is_loopback
from mlx_stack.common.logs import log_event
from mlx_stack.common.meshkeys import MeshKeys
from mlx_stack.common.plain import ProtocolError
from mlx_stack.common.transport import admit_members, configure, receive

log = logging.getLogger("gateway")


class StreamSocket:
    """The bound ROUTER and the endpoint workers reach it at."""

    def __init__(self, settings: Settings, keys: MeshKeys | None, ctx: zmq.Context) -> None:
        # Without a secret, nothing but loopback (the broker refuses to start otherwise).
        local = is_loopback(settings.broker_host) or keys is None
        host = "127.0.0.1" if local else settings.broker_host
        host = "*" if host in ("0.0.0.0", "") else host
        self.auth: ThreadAuthenticator | None = admit_members(ctx, keys) if keys else None
        self.sock = configure(ctx.socket(zmq.ROUTER), settings, keys)
        port = settings.stream_port or "*"
        try:
            self.sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            self.close()
            raise ValueError(f"cannot listen for worker streams on {host}:{port}: "
                             f"{exc.strerror}; choose another stream_port (0 = any free "
                             "port)") from None
        bound = self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2]
        advertised = "tcp://127.0.0.1:0" if local else settings.advertise
        self.endpoint = f"{advertised.rpartition(':')[0]}:{bound}"
        """What SUBMITs name as ``reply_to``."""

    def receive(self) -> list[msgs.Message]:
        """The messages waiting (ACCEPTEDs, PARTIALs, FINALs), decoded, without blocking."""
        return receive(self.sock, wire.TO_GATEWAY, self._refused, envelope=1)

    @staticmethod
    def _refused(exc: ProtocolError) -> None:
        log_event(log, "frame_dropped", logging.DEBUG, reason=exc.reason)

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
