"""broker.election: who coordinates, as time passes and peers come and go."""

from __future__ import annotations

from mlx_stack.broker.election import FORGET_AFTER, MAX_PEERS, BrokerInfo, Election

T = 1.5  # liveness timeout
HOLD = 5.0


def info(node: str, priority: int = 0, started: float = 0.0, coordinator: bool = False,
         epoch: int = 0) -> BrokerInfo:
    return BrokerInfo(node_id=node, endpoint=f"tcp://{node}:4100", priority=priority,
                      started=started, coordinator=coordinator, epoch=epoch)


def test_alone_it_takes_the_role_after_listening_one_timeout() -> None:
    e = Election(info("a"), T, HOLD, now=0)
    assert not e.decide(1.0).coordinator
    decision = e.decide(T)
    assert decision.coordinator and decision.changed and e.me.epoch == 1


def test_the_best_ranked_live_broker_is_chosen_and_followed() -> None:
    a = Election(info("a", priority=1), T, HOLD, now=0)
    b = Election(info("b", priority=0), T, HOLD, now=0)
    a.heard(info("b"), 0.5)
    b.heard(info("a", priority=1), 0.5)
    assert a.decide(T).coordinator
    assert not b.decide(T).coordinator
    b.heard(info("a", priority=1, coordinator=True, epoch=1), T + 0.1)
    decision = b.decide(T + 0.2)
    assert not decision.coordinator and decision.follow.node_id == "a"


def test_rank_ties_go_to_the_earlier_start_then_the_node_id() -> None:
    assert info("b", started=1).rank < info("a", started=2).rank
    assert info("a", started=1).rank < info("b", started=1).rank


def test_a_dead_coordinator_is_replaced_with_a_higher_epoch() -> None:
    b = Election(info("b"), T, HOLD, now=0)
    b.heard(info("a", priority=1, coordinator=True, epoch=4), 1.0)
    assert not b.decide(2.0).coordinator
    decision = b.decide(1.0 + T + 0.01)  # a's last word is older than the timeout
    assert decision.coordinator and b.me.epoch == 5


def test_a_returning_better_broker_waits_the_hold_down() -> None:
    a = Election(info("a", priority=1, started=10), T, HOLD, now=10)
    for t in (10.5, 11.0, 12.0, 13.0, 14.0, 14.9):
        a.heard(info("b", coordinator=True, epoch=3), t)
        assert not a.decide(t).coordinator, t
    a.heard(info("b", coordinator=True, epoch=3), 15.6)
    decision = a.decide(15.6)
    assert decision.coordinator and a.me.epoch == 4


def test_after_a_partition_heals_the_lower_ranked_active_steps_down() -> None:
    b = Election(info("b"), T, HOLD, now=0)
    assert b.decide(T).coordinator
    b.heard(info("a", priority=1, coordinator=True, epoch=7), 3.0)
    decision = b.decide(3.0)
    assert not decision.coordinator and decision.changed and decision.follow.node_id == "a"
    b.heard(info("a", priority=1, coordinator=True, epoch=7), 3.5)
    assert not b.decide(3.5).changed


def test_silent_peers_are_forgotten_and_a_flood_of_endpoints_stays_bounded() -> None:
    e = Election(info("me"), timeout=1.0, hold_down=1.0, now=0.0)
    e.heard(info("old"), 0.0)
    e.decide(FORGET_AFTER + 1.0)
    assert e.peers == {}
    for n in range(MAX_PEERS + 100):
        e.heard(info(f"flood-{n}"), 20.0 + n)
    assert len(e.peers) == MAX_PEERS and "tcp://flood-0:4100" not in e.peers


def test_an_announcement_older_than_one_heard_is_ignored() -> None:
    """Announcements travel on two connections (a broker's own link and its replies on
    ours), so an older one may arrive last: it must not undo a takeover heard already,
    nor let a better-ranked broker take the role before its hold-down."""
    a = Election(info("a", priority=1), T, HOLD, now=0)
    later = info("b", coordinator=True, epoch=1)
    later.seq = 9
    a.heard(later, 1.0)
    earlier = info("b", coordinator=False, epoch=0)
    earlier.seq = 8
    a.heard(earlier, 1.1)
    decision = a.decide(1.1)
    assert not decision.coordinator and decision.follow.node_id == "b"
