"""The broker's links to the other brokers: one DEALER per peer, whether a static peer
(``peers`` setting, ``mlx-stack mesh add``) or one found over mDNS, carrying this broker's
ANNOUNCE every interval; and a monitor per link, which tells at once when a peer's process
dies (its TCP connection closes) rather than after the heartbeat liveness.

Only announcements move here. Who is alive and who coordinates is decided from them in
:mod:`broker.election`; mDNS only proposes candidates (:mod:`common.discovery`).
"""

from __future__ import annotations

import logging

import zmq

from mlx_stack.common.config import Settings
from mlx_stack.common.discovery import Discovery
from mlx_stack.common.logs import log_event
from mlx_stack.common.meshkeys import MeshKeys
from mlx_stack.common.transport import (
    close_watched,
    configure,
    disconnected,
    drain,
    watch_disconnects,
)

log = logging.getLogger("broker")


class PeerLinks:
    """The links of one broker, registered with its poller."""

    def __init__(self, ctx: zmq.Context, settings: Settings, keys: MeshKeys | None,
                 advertise: str, poller: zmq.Poller, discovery: Discovery | None) -> None:
        self.ctx, self.settings, self.keys = ctx, settings, keys
        self.advertise = advertise
        self.poller = poller
        self.discovery = discovery
        self.sockets: dict[str, zmq.Socket] = {}
        self._monitors: dict[zmq.Socket, str] = {}
        self.removed: set[str] = set()
        """Peers removed with ``mesh remove``: not linked again, their announcements ignored."""
        for endpoint in settings.peer_list:
            self.add(endpoint)

    def add(self, endpoint: str) -> None:
        """Announce to the broker at ``endpoint`` from now on (a removed peer is added back
        only by :meth:`restore`)."""
        if endpoint in self.sockets or endpoint in self.removed or endpoint == self.advertise:
            return
        sock = configure(self.ctx.socket(zmq.DEALER), self.settings, self.keys)
        # Announcements go stale: never queue many, and none for a peer not connected (a
        # broker that starts must not read a backlog of what was true before).
        sock.setsockopt(zmq.SNDHWM, 10)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        monitor = watch_disconnects(sock)
        sock.connect(endpoint)
        self.sockets[endpoint] = sock
        self._monitors[monitor] = endpoint
        self.poller.register(monitor, zmq.POLLIN)
        self.poller.register(sock, zmq.POLLIN)
        log_event(log, "peer_added", endpoint=endpoint)

    def restore(self, endpoint: str) -> None:
        """``mesh add`` of a peer removed before."""
        self.removed.discard(endpoint)
        self.add(endpoint)

    def remove(self, endpoint: str) -> bool:
        """Stop announcing to ``endpoint`` for good; whether there was a link."""
        self.removed.add(endpoint)
        sock = self.sockets.pop(endpoint, None)
        if sock is None:
            return False
        monitor = next(m for m, e in self._monitors.items() if e == endpoint)
        del self._monitors[monitor]
        self.poller.unregister(sock)
        self.poller.unregister(monitor)
        close_watched(sock, monitor)
        log_event(log, "peer_removed", endpoint=endpoint)
        return True

    def announce(self, frames: list[bytes]) -> int:
        """Link any broker mDNS found since, then send ``frames`` (an encoded ANNOUNCE) on
        every link; returns how many links were down or too backed up to take it."""
        for endpoint in self.discovery.take() if self.discovery else ():
            self.add(endpoint)
        unsent = 0
        for sock in self.sockets.values():
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                unsent += 1
        return unsent

    def receive(self, ready: dict[zmq.Socket, int]) -> tuple[list[list[bytes]], list[str]]:
        """After a poll: what peers sent back on our links (undecoded), and the peers whose
        process died."""
        replies = []
        for sock in self.sockets.values():
            if sock not in ready:
                continue
            replies.extend(drain(sock))
        lost = [e for m, e in self._monitors.items() if m in ready and disconnected(m)]
        return replies, lost

    def set_coordinator(self, coordinating: bool) -> None:
        """Publish over mDNS whether this broker is the one clients reach as
        mlx-stack.local (it coordinates, and no newer protocol's coordinator is live)."""
        if self.discovery is not None:
            self.discovery.set_coordinator(coordinating)

    def close(self) -> None:
        for monitor, endpoint in self._monitors.items():
            close_watched(self.sockets[endpoint], monitor)
        if self.discovery is not None:
            self.discovery.close()
