"""Version skew: a Mac upgraded before the others. Brokers read each other's protocol
version from the part of an ANNOUNCE every release keeps (common/versions.py ``hello``);
a node of another version is shown ``incompatible (protocol N)`` with what to upgrade,
warned of once, never joins the election and never takes mlx-stack.local from a newer
coordinator; each side goes on serving its own requests.

The "other build" is this code started with ``MLX_STACK_TEST_PROTOCOL`` (the test-only
switch in common/wire.py): its tags carry another number, as another release's do."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import msgpack
import pytest

from mlx_stack.broker.skew import Skew, advice
from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.versions import Hello, hello, tag_role, tag_version
from testkit.harness import Cluster, Mesh, close_and_report, free_port, healthy, run_cli, wait_for
from testkit.scenarios import expected_text


def announce_of(protocol: int, **body: object) -> list[bytes]:
    return [b"MLXS-B%d" % protocol, bytes((msgs.Command.ANNOUNCE,)), msgpack.packb(body)]


def test_hello_reads_another_versions_announce_and_nothing_else() -> None:
    older = announce_of(wire.PROTOCOL - 1, node_id="mini-2", endpoint="tcp://10.0.0.2:4100",
                        coordinator=True, priority=3, some_field_of_that_version=[1])
    assert hello(older) == Hello(wire.PROTOCOL - 1, "mini-2", "tcp://10.0.0.2:4100", True)
    newer = announce_of(wire.PROTOCOL + 1, node_id="mini-3", endpoint="tcp://h:1", version="9.0")
    assert hello(newer) == Hello(wire.PROTOCOL + 1, "mini-3", "tcp://h:1", False, "9.0")
    ours = wire.encode(wire.PEER, msgs.Announce(node_id="me", endpoint="tcp://h:2"))
    assert hello(ours) is None  # our own version decodes normally
    assert hello([b"MLXS-W3", *older[1:]]) is None  # a worker's tag is no broker's hello
    assert hello(announce_of(3, node_id=7, endpoint="tcp://h:1")) is None
    assert hello([b"MLXS-B3", older[1], b"\xc1"]) is None
    assert tag_version(b"MLXS-G12") == 12 and tag_version(b"HTTP/1.1") is None


def test_skew_warns_once_per_broker_and_version_and_yields_the_alias_to_a_newer_one() -> None:
    skew = Skew("mini-1", timeout=1.5)
    old = Hello(wire.PROTOCOL - 1, "mini-2", "tcp://a:1", coordinator=True)
    warning = skew.heard(old, now=0.0)
    assert warning is not None and f"upgrade mini-2 to mlx-stack {msgs.VERSION}" in warning
    assert skew.heard(old, now=0.5) is None  # once, not every announcement
    assert not skew.yields_alias(0.5)  # an older coordinator never takes the alias
    new = Hello(wire.PROTOCOL + 1, "mini-3", "tcp://b:1", coordinator=True, version="0.2.0")
    assert "upgrade mini-1 to mlx-stack 0.2.0" in (skew.heard(new, now=1.0) or "")
    assert skew.yields_alias(1.0)
    assert [s.hello.node_id for s in skew.live(1.0)] == ["mini-2", "mini-3"]
    assert not skew.yields_alias(3.0) and skew.live(3.0) == []  # gone silent
    assert "upgrade mini-1" in advice("mini-1", new)


def test_a_worker_or_gateway_of_another_version_is_warned_of_once_per_role_and_version(
        ) -> None:
    skew = Skew("mini-1", timeout=1.5)
    older = b"MLXS-W%d" % (wire.PROTOCOL - 1)
    warning = skew.local(older)
    assert warning is not None and f"a worker of mesh protocol {wire.PROTOCOL - 1}" in warning
    assert f"mlx-stack {msgs.VERSION}" in warning and "restart it" in warning
    assert skew.local(older) is None  # once, not every heartbeat
    assert "a gateway of" in (skew.local(b"MLXS-G%d" % (wire.PROTOCOL + 1)) or "")
    assert skew.local(b"MLXS-W%d" % wire.PROTOCOL) is None  # our own: a bad frame, no skew
    assert skew.local(b"MLXS-B%d" % (wire.PROTOCOL - 1)) is None  # brokers: their hello
    assert skew.local(b"HTTP/1.1") is None
    assert tag_role(b"MLXS-G12") == ("G", 12) and tag_role(b"MLXS-X1") is None


def test_an_older_worker_and_gateway_on_the_node_are_named_in_one_warning_each(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """After an upgrade, a node's services restarted one by one: its worker and gateway
    still speak the previous protocol. The broker cannot read them; it says so at
    warning, once each, with what to do, however many of their frames it drops."""
    cluster = Cluster(tmp_path)
    older = {"MLX_STACK_TEST_PROTOCOL": str(wire.PROTOCOL - 1)}
    try:
        broker = cluster.broker()
        cluster.start("worker", "--engine", "synthetic", "--model", "syn", env=older)
        cluster.start("gateway", "--port", str(free_port()), env=older)

        def warnings() -> list[str]:
            return [line for line in broker.output().splitlines()
                    if "incompatible_peer" in line]

        def dropped() -> int:
            return cluster.control("status").rejected.get("unknown_protocol", 0)

        wait_for("a warning of each", lambda: len(warnings()) >= 2, timeout=30)
        then = dropped()
        wait_for("more of their frames dropped", lambda: dropped() >= then + 6, timeout=30)
        assert len(warnings()) == 2, warnings()
        assert any(f"a worker of mesh protocol {wire.PROTOCOL - 1}" in w for w in warnings())
        assert any(f"a gateway of mesh protocol {wire.PROTOCOL - 1}" in w for w in warnings())
        assert cluster.workers() == []  # never taken for one of this version's workers
    finally:
        close_and_report(cluster, request.node)


def chat(url: str, content: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "syn", "max_tokens": 12, "messages": [{"role": "user", "content": content}]})


@pytest.mark.parametrize("offset", [1, -1], ids=["node-b-newer", "node-b-older"])
def test_a_node_of_another_protocol_is_shown_warned_and_kept_apart(
        tmp_path: Path, request: pytest.FixtureRequest, offset: int) -> None:
    """node-a outranks node-b: were they of one version, node-a would coordinate both.
    node-b runs another protocol version: each coordinates its own mesh and serves its
    own requests, each shows the other as incompatible with what to upgrade, and the
    newer one holds mlx-stack.local."""
    other = wire.PROTOCOL + offset
    skewed = {"MLX_STACK_TEST_PROTOCOL": str(other)}
    mesh = Mesh(tmp_path, {"node-a": 2, "node-b": 1})
    try:
        mesh.start_broker("node-a")
        broker_b = mesh.start("broker", node="node-b", env=skewed)
        urls = {}
        for node, env in (("node-a", {}), ("node-b", skewed)):
            mesh.start("worker", "--engine", "synthetic", "--model", "syn", "--rate", "200",
                       node=node, env=env)
            port = free_port()
            mesh.start("gateway", "--port", str(port), node=node, env=env)
            urls[node] = f"http://127.0.0.1:{port}"

        def sees_b() -> object:
            """node-a's status once it sees node-b and node-b coordinates its own mesh."""
            status = mesh.status("node-a")
            return status if status and status.coordinating and any(
                peer.coordinator for peer in status.incompatible) else None

        status = wait_for("node-a to see node-b coordinate as incompatible", sees_b,
                          timeout=20)
        (peer,) = status.incompatible
        assert (peer.node_id, peer.protocol, status.peers) == ("node-b", other, [])
        upgrade = "node-b" if offset < 0 else "node-a"
        assert f"upgrade {upgrade} to" in peer.advice
        assert status.alias is (offset < 0)  # a newer coordinator keeps the alias

        # node-b's own view, asked in node-b's version (this process cannot speak it).
        env_b = {**mesh.node_env("node-b"), **skewed, "MLX_STACK_HOME": mesh.env[
            "MLX_STACK_HOME"]}
        view_b = wait_for("node-b's view of node-a", lambda: (v := json.loads(run_cli(
            "mesh", "status", "--json", env=env_b).stdout or "{}")).get("nodes") and any(
            n["node_id"] == "node-a" for n in v["nodes"]) and v, timeout=20)
        assert view_b["coordinator"]["node_id"] == "node-b"  # never joined node-a's election
        assert view_b["coordinator"]["alias"] is (offset > 0)
        row_a = next(n for n in view_b["nodes"] if n["node_id"] == "node-a")
        assert row_a["role"] == f"incompatible (protocol {wire.PROTOCOL})"
        assert f"upgrade {upgrade} to" in row_a["advice"]

        # Each side serves its own requests, with its own workers, exactly.
        for node, url in urls.items():
            wait_for(f"{node}'s gateway", lambda u=url: healthy(u), timeout=30)
            response = chat(url, f"hello from {node}")
            assert response.status_code == 200, response.text
            assert response.headers["x-mlx-stack-node"] == node
            assert response.json()["choices"][0]["message"]["content"] == expected_text(
                f"hello from {node}", 12)

        table = run_cli("mesh", "nodes", env={**mesh.node_env("node-a"),
                                              "MLX_STACK_HOME": mesh.env["MLX_STACK_HOME"]})
        assert f"incompatible (protocol {other})" in table.stdout, table.stdout
        assert f"upgrade {upgrade} to" in " ".join(table.stdout.split()), table.stdout
        # Warned once, with the fix, though announcements keep coming every interval.
        broker_a = mesh.brokers["node-a"].output()
        assert broker_a.count("incompatible_peer") == 1, broker_a
        assert broker_b.output().count("incompatible_peer") == 1, broker_b.output()
    finally:
        close_and_report(mesh, request.node)
