"""`mlx-stack mesh ...` against real running nodes: both output forms, and the errors."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_stack.common.meshkeys import new_secret
from testkit.harness import Mesh, close_and_report, free_port, run_cli, wait_for

SYN = ("--engine", "synthetic", "--model", "syn", "--slots", "4", "--rate", "500")


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """Two nodes sharing a secret that do NOT know each other yet (no static peers):
    node-a with a worker and a gateway, node-b a bare broker."""
    m = Mesh(tmp_path, {"node-a": 1, "node-b": 0}, secret=new_secret())
    m.env["MLX_STACK_PEERS"] = ""
    try:
        m.start_brokers()
        add_worker(m)
        yield m
    finally:
        close_and_report(m, request.node)


def add_worker(m: Mesh) -> None:
    before = len(m.answered_status("node-a").workers)
    m.start("worker", *SYN, node="node-a")
    wait_for("the worker at node-a",
             lambda: m.status_says("node-a", lambda s: len(s.workers) > before), timeout=30)


def mesh_cli(m: Mesh, *args: str, node: str = "node-a") -> Any:
    """Run a mesh command as the user of ``node`` would; JSON output parsed."""
    result = run_cli("mesh", *args, env={**m.env, **m.node_env(node)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if "--json" in args else result.stdout


def node_ids(m: Mesh) -> set[str]:
    return {n["node_id"] for n in mesh_cli(m, "nodes", "--json")}


def test_status_nodes_add_remove(mesh: Mesh) -> None:
    assert node_ids(mesh) == {"node-a"}
    status = mesh_cli(mesh, "status", "--json")
    assert status["enabled"] and len(status["mesh_id"]) == 12
    assert status["coordinator"]["node_id"] == "node-a" and status["coordinator"]["epoch"] >= 1
    [node] = status["nodes"]
    assert node["role"] == "coordinator" and [m["model_id"] for m in node["models"]] == ["syn"]
    assert (node["slots_in_use"], node["slots_total"]) == (0, 4)
    assert status["models"] == [{"model": "syn", "engine": "synthetic", "workers": 1,
                                 "slots_in_use": 0, "slots_total": 4, "context_length": 262_144,
                                 "queued": 0}]
    assert status["tiers"] == []  # syn has none

    out = mesh_cli(mesh, "add", f"127.0.0.1:{mesh.ports['node-b']}")
    assert "added" in out
    wait_for("node-b in `mesh nodes`", lambda: node_ids(mesh) == {"node-a", "node-b"})
    roles = {n["node_id"]: n["role"] for n in mesh_cli(mesh, "nodes", "--json")}
    assert roles == {"node-a": "coordinator", "node-b": "standby"}
    # Asked at node-b, a standby, the answer is the coordinator's view.
    assert mesh_cli(mesh, "status", "--json", node="node-b")["coordinator"][
        "node_id"] == "node-a"
    table = mesh_cli(mesh, "status")
    assert "coordinator" in table and "standby" in table and "syn" in table
    assert f"tcp://127.0.0.1:{mesh.ports['node-b']}" in (
        Path(mesh.env["MLX_STACK_HOME"]) / "config.toml").read_text()

    assert "removed node-b" in mesh_cli(mesh, "remove", "node-b")
    wait_for("node-b gone from `mesh nodes`", lambda: node_ids(mesh) == {"node-a"})
    assert "node-b" not in mesh_cli(mesh, "nodes")


def test_routes_lists_the_last_decisions_with_scores(mesh: Mesh) -> None:
    add_worker(mesh)
    url = mesh.gateway(node="node-a")
    for i in range(7):
        r = httpx.post(f"{url}/v1/completions", timeout=20, json={
            "model": "syn", "prompt": f"request {i}", "max_tokens": 3})
        assert r.status_code == 200, r.text
    routes = mesh_cli(mesh, "routes", "--last", "5", "--json")
    assert len(routes) == 5
    for route in routes:
        assert route["outcome"] == "ok" and route["model"] == "syn"
        assert len(route["candidates"]) == 2
        assert all(isinstance(c["score"], float) for c in route["candidates"])
        assert route["worker_id"] in {c["worker_id"] for c in route["candidates"]}
    table = mesh_cli(mesh, "routes", "--last", "5")
    assert "Last 5 routing decisions" in table and table.count(" ok ") == 5
    # The CLI's questions never count as gateways: only the one real gateway does.
    status = mesh.answered_status("node-a")
    assert status.gateways <= 1, status.gateways  # <: the gateway's own may lag a beat


def test_errors_have_clear_messages_and_exit_codes(tmp_path: Path) -> None:
    home = {"MLX_STACK_HOME": str(tmp_path / "home")}
    nobody = run_cli("mesh", "status", "--broker", f"tcp://127.0.0.1:{free_port()}", env=home)
    assert nobody.returncode == 3 and "no broker answered" in nobody.stderr
    for args in (("token",), ("add", "127.0.0.1:4100"), ("remove", "node-b")):
        disabled = run_cli("mesh", *args, env=home)
        assert disabled.returncode == 4 and "mesh enable" in disabled.stderr, args
    enabled = {"MLX_STACK_HOME": str(tmp_path / "enabled")}
    assert run_cli("mesh", "enable", env=enabled).returncode == 0
    bad = run_cli("mesh", "add", "a b:1", env=enabled)  # never saved to config.toml
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    assert "a b" not in (tmp_path / "enabled" / "config.toml").read_text()
    bad_token = run_cli("mesh", "enable", "--join", "mlxs1-garbled", env=home)
    assert bad_token.returncode == 2 and "mesh token" in bad_token.stderr
    assert run_cli("mesh", "routes", "--last", "0", env=home).returncode == 2


def test_enable_token_join_disable(tmp_path: Path) -> None:
    first = {"MLX_STACK_HOME": str(tmp_path / "first")}
    second = {"MLX_STACK_HOME": str(tmp_path / "second")}
    enabled = run_cli("mesh", "enable", "--priority", "3", env=first)
    assert enabled.returncode == 0, enabled.stderr
    secret_file = tmp_path / "first" / "mesh.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    config = (tmp_path / "first" / "config.toml").read_text()
    assert 'broker_host = "0.0.0.0"' in config and "priority = 3" in config
    token = run_cli("mesh", "token", env=first).stdout.strip()
    assert token.startswith("mlxs1-") and token not in enabled.stdout + enabled.stderr
    joined = run_cli("mesh", "enable", "--join", token, env=second)
    assert joined.returncode == 0, joined.stderr
    assert (tmp_path / "second" / "mesh.secret").read_bytes() == secret_file.read_bytes()
    mesh_id = enabled.stdout.split()[1]
    assert mesh_id in joined.stdout  # same secret, same mesh id
    assert run_cli("mesh", "disable", env=first).returncode == 0
    assert not secret_file.exists()
    assert "broker_host" not in (tmp_path / "first" / "config.toml").read_text()
    assert run_cli("mesh", "token", env=first).returncode == 4
