"""Which broker is the coordinator: rank, liveness from peer heartbeats, hold-down.

Pure logic, no I/O: the broker feeds it the ANNOUNCE messages it hears and asks it, once
per heartbeat interval, whether it should be active and whom to redirect to.

Rules (MESH.md, "Discovery and election"):
- Rank = (higher priority, earlier start, smaller node id); mDNS only finds candidates,
  liveness is heard announcements within the timeout.
- A live peer that says it is active is followed, unless this broker outranks it and has
  seen it for the hold-down period: then this broker takes over (no flapping when a
  higher-priority broker comes back).
- With no active peer, the best-ranked live broker takes the role, once it has listened
  for one timeout after starting (so it hears who is there before claiming).
- An active broker that hears a better-ranked active peer steps down (partition heal).
- Taking the role sets epoch = highest epoch seen + 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class BrokerInfo:
    """One broker as its announcements describe it."""

    node_id: str
    endpoint: str
    priority: int
    started: float
    epoch: int = 0
    active: bool = False
    first_seen: float = 0.0
    last_seen: float = 0.0

    @property
    def rank(self) -> tuple[int, float, str]:
        """Smaller is better: higher priority, then earlier start, then node id."""
        return (-self.priority, self.started, self.node_id)


@dataclass(frozen=True, slots=True)
class Decision:
    active: bool
    leader: BrokerInfo | None
    """The broker to redirect to (None while no one leads, or when this one does)."""
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

    def heard(self, info: BrokerInfo, now: float) -> None:
        """Record an announcement from a peer."""
        if info.endpoint == self.me.endpoint:
            return
        known = self.peers.get(info.endpoint)
        alive = known is not None and now - known.last_seen <= self.timeout
        info.first_seen = known.first_seen if alive and known else now
        info.last_seen = now
        self.peers[info.endpoint] = info
        self.max_epoch = max(self.max_epoch, info.epoch)

    def lost(self, endpoint: str) -> None:
        """A peer's connection closed (its process died): it is no longer live."""
        self.peers.pop(endpoint, None)

    def live(self, now: float) -> list[BrokerInfo]:
        return [p for p in self.peers.values() if now - p.last_seen <= self.timeout]

    def decide(self, now: float) -> Decision:
        """Whether this broker should be active now, and whom to follow otherwise."""
        live = self.live(now)
        actives = sorted((p for p in live if p.active and p.epoch >= 0), key=lambda p: p.rank)
        was = self.me.active
        if self.me.active:
            if actives and actives[0].rank < self.me.rank:
                self.me.active = False  # a better coordinator is back: hand over
        elif actives:
            leader = actives[0]
            if leader.rank > self.me.rank and now - leader.first_seen >= self.hold_down:
                self._take(now)
        elif now >= self.listen_until and all(p.rank > self.me.rank for p in live):
            self._take(now)
        leader = None if self.me.active else (actives[0] if actives else None)
        return Decision(self.me.active, leader, self.me.active != was)

    def _take(self, now: float) -> None:
        self.me.active = True
        self.max_epoch += 1
        self.me.epoch = self.max_epoch
