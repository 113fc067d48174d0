"""Brokers of another protocol version: seen, shown, warned of once, never followed.

People upgrade one Mac at a time, so for a while some brokers speak another protocol
version. Their messages cannot be decoded (the tags differ: :mod:`common.wire`), but
every release reads the :class:`~common.versions.Hello` in another one's ANNOUNCE. This
table keeps who spoke which version lately, for ``mesh status`` / ``mesh nodes`` and the
dashboard (``incompatible (protocol N)``), and decides, without I/O:

- what to tell the user, once per broker and version: which Mac to upgrade to what;
- whether this broker leaves the ``mlx-stack.local`` alias alone: a live coordinator of a
  newer protocol owns it, so clients reach the upgraded part of the fleet.

Such a broker never enters the election (:mod:`broker.election` never hears it): the two
versions form two meshes, each serving its own gateways with its own workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_stack.common.messages import VERSION
from mlx_stack.common.status import PeerStatus
from mlx_stack.common.versions import Hello, tag_role
from mlx_stack.common.wire import PROTOCOL

ROLES = {"G": "gateway", "W": "worker"}

MAX_STRANGERS = 64
"""Most brokers of other versions remembered: a flood of made-up ones evicts the stalest."""


@dataclass(slots=True)
class Stranger:
    """A broker of another protocol version, as its last announcement described it."""

    hello: Hello
    last_seen: float


def advice(me: str, other: Hello) -> str:
    """What to do about ``other``, said from node ``me``: upgrade the older of the two."""
    if other.protocol < PROTOCOL:
        return (f"{other.node_id} speaks mesh protocol {other.protocol}, {me} speaks "
                f"{PROTOCOL}: they serve as two meshes until you upgrade {other.node_id} "
                f"to mlx-stack {VERSION} (protocol {PROTOCOL}), as {me} runs")
    release = f"mlx-stack {other.version}" if other.version else "the release"
    return (f"{other.node_id} speaks mesh protocol {other.protocol}, {me} speaks "
            f"{PROTOCOL}: they serve as two meshes until you upgrade {me} to {release} "
            f"(protocol {other.protocol}), as {other.node_id} runs; meanwhile "
            f"mlx-stack.local stays with {other.node_id}'s mesh")


class Skew:
    """The brokers of other protocol versions heard within ``timeout`` seconds."""

    def __init__(self, me: str, timeout: float) -> None:
        self.me = me
        self.timeout = timeout
        self.strangers: dict[str, Stranger] = {}
        """By endpoint."""
        self.warned: set[tuple[str, int]] = set()
        """(endpoint, protocol) already warned of: once, not every announcement."""
        self.warned_local: set[tuple[str, int]] = set()
        """(role, protocol) of workers and gateways already warned of."""

    def heard(self, hello: Hello, now: float) -> str | None:
        """Record ``hello``; the warning to log when this broker or its version is new."""
        self.strangers[hello.endpoint] = Stranger(hello, now)
        while len(self.strangers) > MAX_STRANGERS:
            del self.strangers[min(self.strangers,
                                   key=lambda e: self.strangers[e].last_seen)]
        key = (hello.endpoint, hello.protocol)
        if key in self.warned:
            return None
        if len(self.warned) > 4 * MAX_STRANGERS:
            self.warned.clear()
        self.warned.add(key)
        return advice(self.me, hello)

    def local(self, tag: bytes) -> str | None:
        """A message of a worker or gateway (on this node, often: its services restarted
        one by one after an upgrade) tagged ``tag``, of another protocol version, cannot
        be read: the warning to log, once per role and version (None: not such a tag, or
        warned of already). Unlike a broker's, such a message says nothing of its node."""
        role = tag_role(tag)
        if role is None or role[0] not in ROLES or role[1] == PROTOCOL:
            return None
        if role in self.warned_local:
            return None
        self.warned_local.add(role)
        return (f"a {ROLES[role[0]]} of mesh protocol {role[1]} reaches this broker "
                f"(protocol {PROTOCOL}, mlx-stack {VERSION}): its messages are dropped "
                f"until it runs the same release: upgrade its Mac and restart it "
                f"(mlx-stack up, or mlx-stack install's services)")

    def live(self, now: float) -> list[Stranger]:
        """Those heard within the timeout, by node id."""
        return sorted((s for s in self.strangers.values()
                       if now - s.last_seen <= self.timeout), key=lambda s: s.hello.node_id)

    def status(self, now: float) -> list[PeerStatus]:
        """Those heard within the timeout as CONTROL ``status`` shows them (its
        ``incompatible``), each with what to upgrade."""
        return [PeerStatus(node_id=s.hello.node_id, endpoint=s.hello.endpoint,
                           coordinator=s.hello.coordinator, protocol=s.hello.protocol,
                           advice=advice(self.me, s.hello),
                           last_seen_s=round(now - s.last_seen, 3))
                for s in self.live(now)]

    def yields_alias(self, now: float) -> bool:
        """Whether a live coordinator of a newer protocol owns ``mlx-stack.local``: then
        this broker does not publish it, even while it coordinates its own mesh."""
        return any(s.hello.protocol > PROTOCOL and s.hello.coordinator for s in self.live(now))
