"""Which broker is the coordinator: rank, liveness from peer heartbeats, hold-down.

Pure logic, no I/O: the broker feeds it the ANNOUNCE messages it hears and asks it, once
per heartbeat interval, whether it should coordinate and whom to redirect to.

Rules (MESH.md, "Discovery and election"):
- Rank = (higher priority, earlier start, smaller node id); mDNS only finds candidates,
  liveness is heard announcements within the timeout.
- A live peer that says it coordinates is followed, unless this broker outranks it and has
  seen it for the hold-down period: then this broker takes over (no flapping when a
  higher-priority broker comes back).
- With no coordinating peer, the best-ranked live broker takes the role, once it has listened
  for one timeout after starting (so it hears who is there before claiming).
- A coordinator that hears a better-ranked coordinator steps down (partition heal).
- Taking the role sets epoch = highest epoch seen + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_stack.common.status import PeerStatus

FORGET_AFTER = 10
"""Peers silent for this many timeouts are forgotten (they are long dead to the
election already; mDNS or a restart brings them back)."""
MAX_PEERS = 256
"""Most peers remembered: a flood of made-up endpoints evicts the stalest."""


@dataclass(slots=True)
class BrokerInfo:
    """One broker as its announcements describe it."""

    node_id: str
    endpoint: str
    priority: int
    started: float
    epoch: int = 0
    coordinator: bool = False
    seq: int = 0
    """The announcement's number in its broker's process (``started``)."""
    first_seen: float = 0.0
    last_seen: float = 0.0

    @property
    def rank(self) -> tuple[int, float, str]:
        """Smaller is better: higher priority, then earlier start, then node id."""
        return (-self.priority, self.started, self.node_id)


@dataclass(frozen=True, slots=True)
class Decision:
    coordinator: bool
    """Whether this broker coordinates."""
    follow: BrokerInfo | None
    """The coordinator to redirect to (None while there is none, or when this one is)."""
    changed: bool


class Election:
    def __init__(self, me: BrokerInfo, timeout: float, hold_down: float,
                 now: float) -> None:
        self.me = me
        self.timeout = timeout
        self.hold_down = hold_down
        self.listen_until = now + timeout
        self.peers: dict[str, BrokerInfo] = {}
        self.max_epoch = me.epoch

    def heard(self, info: BrokerInfo, now: float) -> bool:
        """Record an announcement from a peer; False when it is ignored (our own, or older
        than one heard from the same process)."""
        if info.endpoint == self.me.endpoint:
            return False
        known = self.peers.get(info.endpoint)
        if known is not None and known.started == info.started and info.seq < known.seq:
            return False
        alive = known is not None and now - known.last_seen <= self.timeout
        info.first_seen = known.first_seen if alive and known else now
        info.last_seen = now
        self.peers[info.endpoint] = info
        self.max_epoch = max(self.max_epoch, info.epoch)
        while len(self.peers) > MAX_PEERS:
            del self.peers[min(self.peers, key=lambda e: self.peers[e].last_seen)]
        return True

    def lost(self, endpoint: str) -> None:
        """A peer's connection closed (its process died): it is no longer live."""
        self.peers.pop(endpoint, None)

    def live(self, now: float) -> list[BrokerInfo]:
        return [p for p in self.peers.values() if now - p.last_seen <= self.timeout]

    def status(self, now: float) -> list[PeerStatus]:
        """The live peers as CONTROL ``status`` shows them."""
        return [PeerStatus(node_id=b.node_id, endpoint=b.endpoint, coordinator=b.coordinator,
                           epoch=b.epoch, priority=b.priority,
                           last_seen_s=round(now - b.last_seen, 3))
                for b in self.live(now)]

    def decide(self, now: float) -> Decision:
        """Whether this broker should coordinate now, and whom to follow otherwise."""
        for endpoint in [e for e, peer in self.peers.items()
                         if now - peer.last_seen > FORGET_AFTER * self.timeout]:
            del self.peers[endpoint]
        live = self.live(now)
        coordinators = sorted((p for p in live if p.coordinator and p.epoch >= 0),
                              key=lambda p: p.rank)
        was = self.me.coordinator
        if self.me.coordinator:
            if coordinators and coordinators[0].rank < self.me.rank:
                self.me.coordinator = False  # a better coordinator is back: hand over
        elif coordinators:
            best = coordinators[0]
            if best.rank > self.me.rank and now - best.first_seen >= self.hold_down:
                self._take(now)
        elif now >= self.listen_until and all(p.rank > self.me.rank for p in live):
            self._take(now)
        follow = None if self.me.coordinator else (coordinators[0] if coordinators else None)
        return Decision(self.me.coordinator, follow, self.me.coordinator != was)

    def _take(self, now: float) -> None:
        self.me.coordinator = True
        self.max_epoch += 1
        self.me.epoch = self.max_epoch
