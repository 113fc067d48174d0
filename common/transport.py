"""ZeroMQ socket set-up shared by every role, so each socket in the mesh behaves alike.

Why each option:
- ``LINGER`` small: a closing process must not hang on unsent frames to a dead peer.
- ``ROUTER_MANDATORY``: sending to a vanished peer raises ``EHOSTUNREACH`` instead of
  dropping the frame silently, so the broker learns of the loss at once.
- ZMTP heartbeats: a second line of liveness below ours; a frozen peer's connection is
  closed after the timeout (without them libzmq notices nothing for a long time).
- ``MAXMSGSIZE``: an oversize frame closes the connection before it is ever buffered.
- Reconnect interval with a cap: capped exponential backoff when a peer is away.
- High water marks raised: a token stream is many small frames; the default of 1000 could
  block or drop a burst.
"""

from __future__ import annotations

import zmq

from common.config import Settings
from common.protocol import MAX_BODY_BYTES

HWM = 100_000


def configure(sock: zmq.Socket, settings: Settings) -> zmq.Socket:
    """Apply the mesh-wide options to a fresh socket and return it."""
    interval_ms = int(settings.heartbeat_interval * 1000)
    sock.setsockopt(zmq.LINGER, 100)
    sock.setsockopt(zmq.HEARTBEAT_IVL, interval_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, interval_ms * settings.heartbeat_liveness)
    sock.setsockopt(zmq.HEARTBEAT_TTL, interval_ms * settings.heartbeat_liveness)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_BODY_BYTES + 1024)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if sock.socket_type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock
