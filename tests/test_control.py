"""CONTROL answers without a broker: every operation reads a snapshot (or asks the broker
for one of the two peer changes), and a bad question is refused with the operations."""

from __future__ import annotations

from mlx_stack.broker import control
from mlx_stack.common import messages as msgs
from mlx_stack.common.status import BrokerStatus, ModelEntry, Route


class Peers:
    """The peer changes a broker makes, remembered."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.removed: list[str] = []

    def add_peer(self, endpoint: str) -> bool:
        self.added.append(endpoint)
        return True

    def remove_peer(self, endpoint: str) -> bool:
        self.removed.append(endpoint)
        return False


SNAPSHOT = control.Snapshot(
    status=BrokerStatus(node_id="n", endpoint="tcp://n:4100", role="coordinator",
                        coordinator="tcp://n:4100", epoch=7,
                        models=[ModelEntry(id="m", model_id="m")]),
    routes=[Route(job_id=f"j{i}", model="m") for i in range(30)])


def ask(op: str, peers: Peers | None = None, **args: object) -> msgs.ControlReply:
    return control.answer(msgs.Control(request_id="r", op=op, args=args), SNAPSHOT,
                          peers or Peers())


def test_questions_are_answered_from_the_snapshot_with_its_epoch() -> None:
    status = ask("status")
    assert status.ok and status.epoch == 7 and status.result["node_id"] == "n"
    assert ask("models").result == [{"id": "m", "model_id": "m", "engine": "mlx",
                                     "workers": 0, "nodes": [], "tiers": [],
                                     "context_length": 0, "queued": 0, "ambiguous": []}]
    assert [r["job_id"] for r in ask("routes", last=2).result] == ["j28", "j29"]
    assert len(ask("routes", last="all").result) == control.ROUTES


def test_peer_changes_are_the_brokers_and_bad_questions_are_refused() -> None:
    peers = Peers()
    assert ask("add_peer", peers, endpoint="tcp://other:4100").result is True
    assert ask("remove_peer", peers, endpoint="tcp://gone:4100").result is False
    assert (peers.added, peers.removed) == (["tcp://other:4100"], ["tcp://gone:4100"])
    for reply in (ask("add_peer", peers, endpoint="not an endpoint"), ask("reboot")):
        assert not reply.ok and reply.epoch == 7 and "status|models|routes" in reply.error
    assert peers.added == ["tcp://other:4100"]
