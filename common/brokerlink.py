"""A worker's or a gateway's connection to the broker it uses: the client half of the
zguide's Paranoid Pirate, written once for both roles.

What it holds: which broker (:class:`~common.transport.BrokerChoice`: this node's, then
the coordinator a REDIRECT names, then the static peers in turn), one DEALER socket and
its disconnect monitor, the epoch fence, the broker's session, and when the broker was
last heard. What it does not do: decide. The role's own loop polls :attr:`sock` and
:attr:`monitor`, reads :meth:`receive`, and calls :meth:`reconnect` when
:meth:`closed` or :meth:`silent` says the broker is gone, or a REDIRECT names another.

The sockets are plain ones: the worker polls them itself, the gateway's event loop
watches their file descriptors (gateway/client.py). The link sends with ``NOBLOCK`` and
drains what arrived without blocking, so that no role ever blocks on a broker that is
not there.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import zmq

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.config import Settings
from mlx_stack.common.logs import log_event
from mlx_stack.common.meshkeys import MeshKeys
from mlx_stack.common.plain import ProtocolError
from mlx_stack.common.transport import (
    BrokerChoice,
    close_watched,
    configure,
    disconnected,
    receive,
    watch_disconnects,
)

log = logging.getLogger("brokerlink")

MAX_BACKOFF = 8.0
"""Longest extra wait for a broker after reconnecting (capped exponential backoff)."""


class BrokerLink:
    """One role's DEALER to its broker; see the module docstring.

    ``hello`` is what is sent first on every new connection (a worker's READY, a gateway's
    HEARTBEAT), so the broker answers, and knows the sender, at once."""

    def __init__(self, settings: Settings, protocol: bytes, keys: MeshKeys | None,
                 hello: Callable[[], msgs.Message], ctx: zmq.Context | None = None) -> None:
        self.settings = settings
        self.protocol = protocol
        self.keys = keys
        self.hello = hello
        self.ctx = ctx or zmq.Context.instance()
        self.broker = BrokerChoice(settings.broker_candidates)
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.max_epoch = 0
        self.session = ""
        self.heard = 0.0
        self.connected_at = 0.0
        self.backoff = 0.0
        """Extra seconds granted to the broker after a reconnect; doubles each time the
        broker stays silent, back to 0 once it answers."""
        self.counters: collections.Counter[str] = collections.Counter()

    @property
    def endpoint(self) -> str:
        return self.broker.current

    def connect(self) -> None:
        """(Re)open the DEALER to :attr:`endpoint` and say hello."""
        if self.sock is not None and self.monitor is not None:
            close_watched(self.sock, self.monitor)
        self.sock = configure(self.ctx.socket(zmq.DEALER), self.settings, self.keys)
        # A broker elsewhere that refuses the connection is dead: a standby may redirect
        # here in the instant before it learns that the coordinator died. Move on at once
        # rather than after the silence. (This node's own broker is waited for: there is
        # nowhere better to go, and a retry loop would spin.)
        self.monitor = watch_disconnects(
            self.sock, refusals=self.broker.current != self.broker.candidates[0])
        self.sock.connect(self.broker.current)
        # Fencing and sessions hold per connection: a restarted lone broker counts epochs
        # from 1 again, and its clients must not ignore it for ever.
        self.max_epoch = 0
        self.session = ""
        self.connected_at = time.monotonic()
        self.send(self.hello())

    def reconnect(self, reason: str, to: str = "") -> None:
        """Leave the broker in use: for ``to`` (a REDIRECT), else for the next candidate,
        with a longer grace each time a broker stays silent."""
        if to:
            self.broker.redirect(to)
        else:
            self.broker.advance()
            self.backoff = min(max(self.backoff * 2, self.settings.heartbeat_interval),
                               MAX_BACKOFF)
        log_event(log, "broker_changed", logging.INFO, reason=reason, now=self.broker.current)
        self.connect()

    def send(self, msg: msgs.Message) -> bool:
        """Send without blocking; with no broker there the frame is dropped (and counted:
        the jobs it belongs to are resubmitted by their gateway)."""
        assert self.sock is not None, "connect() first"
        try:
            self.sock.send_multipart(wire.encode(self.protocol, msg), zmq.NOBLOCK)
        except zmq.Again:
            self.counters["frames_unsent"] += 1
            return False
        return True

    def receive(self) -> list[msgs.Message]:
        """The messages waiting, decoded and fenced, without blocking. Malformed frames
        and frames from a broker older than the newest epoch seen are dropped (counted)."""
        assert self.sock is not None, "connect() first"
        out: list[msgs.Message] = []
        for msg in receive(self.sock, wire.FROM_BROKER, self._refused):
            if msg.epoch < self.max_epoch:
                self.counters["stale_epoch"] += 1
                continue
            self.max_epoch = msg.epoch
            self.heard = time.monotonic()
            self.backoff = 0.0
            out.append(msg)
        return out

    def _refused(self, exc: ProtocolError) -> None:
        self.counters["frames_dropped"] += 1
        log_event(log, "frame_dropped", logging.DEBUG, reason=exc)

    def restarted(self, beat: msgs.Heartbeat) -> bool:
        """Whether ``beat`` comes from another broker process than the earlier ones on
        this connection (it restarted, or another took its address): what was open with
        the old one is lost."""
        known, self.session = self.session, beat.session
        return bool(known) and known != beat.session

    def closed(self) -> bool:
        """Whether the connection was lost (the broker's process died, or ZMTP heartbeats
        timed out) or refused: known in milliseconds, without waiting out the silence."""
        return self.monitor is not None and disconnected(self.monitor)

    def silent(self, now: float) -> bool:
        """Whether the broker said nothing for the liveness (plus the backoff)."""
        last_word = max(self.heard, self.connected_at)
        return now - last_word > self.settings.peer_timeout + self.backoff

    def close(self, linger: int = 100) -> None:
        """Close the socket (``linger`` ms for what is still queued, a goodbye say)."""
        if self.sock is not None and self.monitor is not None:
            close_watched(self.sock, self.monitor, linger=linger)
            self.sock = self.monitor = None
