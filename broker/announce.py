"""What a broker's ANNOUNCE says, and whether to believe one heard from a peer."""

from __future__ import annotations

from mlx_stack.broker.election import BrokerInfo, Election
from mlx_stack.common import messages as msgs
from mlx_stack.common.config import ENDPOINT
from mlx_stack.common.plain import INT_MAX

MODELS_ANNOUNCED = 64
"""Most model names one ANNOUNCE carries (the most recently served): enough for any
mesh of Macs, and a bound on what a peer must store."""


def announcement(election: Election, epoch: int, seq: int,
                 known_models: dict[str, float]) -> msgs.Announce:
    """This broker's ANNOUNCE number ``seq``, naming the models it knows, most recent
    first: a coordinator's served lately (a standby that takes over knows them), a
    standby's its node's workers will serve (the coordinator knows them while they
    load)."""
    me = election.me
    models = sorted(known_models, key=known_models.__getitem__, reverse=True
                    )[:MODELS_ANNOUNCED]
    return msgs.Announce(node_id=me.node_id, endpoint=me.endpoint, priority=me.priority,
                         started=me.started, coordinator=me.coordinator, epoch=epoch, seq=seq,
                         models=models)


def doubt(msg: msgs.Announce) -> str | None:
    """Why an ANNOUNCE does not describe a broker one could be redirected to, or None.
    Its epoch must leave room for one more (a higher one, taken over, would not be on
    the wire: every peer would refuse this broker's messages)."""
    if not ENDPOINT.fullmatch(msg.endpoint):
        return f"endpoint {msg.endpoint[:80]!r}"
    if not (0 <= msg.epoch < INT_MAX and msg.started >= 0 and msg.seq >= 0):
        return f"epoch {msg.epoch}, started {msg.started}"
    if len(msg.models) > MODELS_ANNOUNCED:
        return f"{len(msg.models)} models"
    return None


def info(msg: msgs.Announce) -> BrokerInfo:
    """The election's view of the broker ``msg`` describes."""
    return BrokerInfo(node_id=msg.node_id, endpoint=msg.endpoint, priority=msg.priority,
                      started=msg.started, epoch=msg.epoch, coordinator=msg.coordinator,
                      seq=msg.seq)
