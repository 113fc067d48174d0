"""One name, one model, across a mesh of real processes: two nodes whose workers serve
different models under the tier ``standard``. The mesh says so (the coordinator's log,
``mlx-stack mesh status``, ``/v1/models``) and every request for ``standard`` is answered
by one model, the one most workers serve it with."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.harness import Mesh, close_and_report, run_cli, wait_for

SYN = ("--engine", "synthetic", "--slots", "2", "--rate", "500")


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """node-a (coordinator) serves ``mini`` as standard; node-b serves ``qwen`` as standard
    (two workers) and premium (one of them). ``mini`` sorts first: only the majority can
    send ``standard`` to ``qwen``."""
    m = Mesh(tmp_path, {"node-a": 1, "node-b": 0})
    try:
        m.start_brokers()
        wait_for("one coordinator", lambda: m.coordinator(peers=1), timeout=30)
        m.start("worker", *SYN, "--model", "mini=standard", node="node-a")
        m.start("worker", *SYN, "--model", "qwen=standard,premium", node="node-b")
        m.start("worker", *SYN, "--model", "qwen=standard", node="node-b")
        wait_for("three workers at the coordinator",
                 lambda: m.status_says("node-a", lambda s: len(s.workers) == 3), timeout=60)
        yield m
    finally:
        close_and_report(m, request.node)


def test_a_name_two_models_serve_is_marked_and_answered_by_one(mesh: Mesh) -> None:
    url = mesh.gateway(node="node-b")
    answered: Counter[str] = Counter()
    for i in range(8):
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "standard", "max_tokens": 3,
            "messages": [{"role": "user", "content": f"hello {i}"}]})
        assert reply.status_code == 200, reply.text
        answered[reply.json()["model"]] += 1
    assert answered == {"qwen": 8}  # each response names the model that answered
    cards = {c["id"]: c for c in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
    assert cards["standard"]["root"] == "qwen"
    assert cards["standard"]["ambiguous"] == ["mini", "qwen"]
    assert cards["premium"]["root"] == "qwen" and cards["premium"]["ambiguous"] == []
    assert cards["qwen"]["tiers"] == ["premium", "standard"]
    assert cards["qwen"]["context_length"] == cards["qwen"]["max_model_len"] == 262_144

    result = run_cli("mesh", "status", "--json", env={**mesh.env, **mesh.node_env("node-b")})
    assert result.returncode == 0, result.stderr
    tiers = {t["tier"]: t for t in json.loads(result.stdout)["tiers"]}
    assert sorted(tiers) == ["premium", "standard"]
    assert tiers["standard"]["model"] == "qwen" and tiers["standard"]["nodes"] == ["node-b"]
    assert tiers["standard"]["ambiguous"] == ["mini", "qwen"]
    table = run_cli("mesh", "status", env={**mesh.env, **mesh.node_env("node-b")}).stdout
    assert "ambiguous: also served by mini" in table and "another tier" in table

    log = mesh.brokers["node-a"].output()
    warned = [line for line in log.splitlines() if "name_ambiguous" in line]
    assert len(warned) == 1, log
    assert "name=standard" in warned[0] and "give one of them another tier" in warned[0]
