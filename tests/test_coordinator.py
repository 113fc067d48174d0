"""Coordinator election and failover among brokers on loopback (static peers).

Three nodes, each a broker, a gateway and two synthetic workers. The brokers elect the
highest-priority one; SIGKILL it while 100 streams run through the other nodes' gateways
and every stream completes exactly, resumed through the new coordinator.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from zeroconf import ServiceInfo, Zeroconf

from mlx_stack.common.discovery import ALIAS, COORDINATOR, SERVICE
from testkit.harness import Mesh, close_and_report, free_port, healthy, wait_for
from testkit.scenarios import (
    NODES,
    expected_text,
    failover_body,
    kill_coordinator_under_streams,
    start_nodes,
)
from testkit.sse import ChatStream, read_chat

HB = "MLX_STACK_HEARTBEAT_INTERVAL"


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """Three brokers; ``request.param`` (if any) is the heartbeat interval in seconds."""
    interval = getattr(request, "param", 0.2)
    m = Mesh(tmp_path, NODES, env={"MLX_STACK_HEARTBEAT_INTERVAL": str(interval)})
    try:
        m.start_brokers()
        yield m
    finally:
        close_and_report(m, request.node)


def test_the_highest_priority_broker_coordinates_and_gathers_every_worker(mesh: Mesh) -> None:
    coordinator = wait_for("one coordinator", mesh.coordinator, timeout=10)
    assert coordinator.node_id == "node-a" and coordinator.epoch >= 1
    start_nodes(mesh)
    wait_for("all 6 workers at the coordinator",
             lambda: mesh.status_says("node-a", lambda s: len(s.workers) == 6), timeout=30)
    for node in ("node-b", "node-c"):
        status = mesh.answered_status(node)
        assert status.role == "standby" and status.workers == []
        assert status.coordinator == mesh.broker_endpoint("node-a")


@pytest.mark.parametrize("mesh", [0.2, 0.5], indirect=True, ids=["hb200ms", "hb500ms"])
def test_coordinator_killed_mid_stream_every_stream_resumes(mesh: Mesh) -> None:
    wait_for("one coordinator", mesh.coordinator, timeout=10)
    urls = start_nodes(mesh)
    wait_for("all 6 workers at the coordinator",
             lambda: mesh.status_says("node-a", lambda s: len(s.workers) == 6), timeout=30)
    report = kill_coordinator_under_streams(
        mesh, [urls["node-b"], urls["node-c"]], streams=100, tokens=60)
    print(f"longest stall of a stream after the kill (heartbeat {mesh.env[HB]} s):", report)
    assert report["max_s"] <= 5.0, report  # the proposal's bound; MESH.md targets 2 s
    coordinator = wait_for("a new coordinator", mesh.coordinator, timeout=10)
    assert coordinator.node_id == "node-b" and coordinator.epoch >= 2


def test_a_model_served_a_moment_ago_waits_for_a_worker_under_the_new_coordinator(
        mesh: Mesh) -> None:
    """Its only node died with the coordinator: the new coordinator knows the model from
    the old one's ANNOUNCEs, so a new request for it waits the grace period for a worker
    (here one that starts on node-b) instead of a 404."""
    import concurrent.futures as cf

    wait_for("one coordinator", mesh.coordinator, timeout=10)
    worker = mesh.start("worker", "--engine", "synthetic", "--model", "solo", node="node-a")
    url = f"http://127.0.0.1:{free_port()}"
    mesh.start("gateway", "--port", url.rsplit(":", 1)[1], node="node-b")
    ask = {"model": "solo", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    wait_for("solo served", lambda: healthy(url) and httpx.post(
        f"{url}/v1/chat/completions", json=ask, timeout=10).status_code == 200, timeout=30)
    wait_for("the coordinator to announce solo",
             lambda: mesh.status_says("node-b", lambda s: "solo" in s.known_models))
    worker.kill(signal.SIGKILL)
    mesh.brokers["node-a"].kill(signal.SIGKILL)
    wait_for("node-b to coordinate", lambda: (s := mesh.status("node-b")) and s.coordinating)
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=ask, timeout=30)
        wait_for("the request to wait at node-b",
                 lambda: mesh.status_says("node-b", lambda s: s.queues.get("solo")), timeout=10)
        mesh.start("worker", "--engine", "synthetic", "--model", "solo", node="node-b")
        response = pending.result(timeout=30)
        assert response.status_code == 200, response.text


def test_a_standby_nodes_expected_model_waits_at_the_coordinator(tmp_path: Path) -> None:
    """``up`` on a node whose broker is a standby: the coordinator learns from its
    ANNOUNCE the names that node's workers will serve, so a request sent while they load
    waits for them (a name nobody expects is still a 404 at once)."""
    import concurrent.futures as cf

    m = Mesh(tmp_path, {"node-a": 2, "node-b": 1})
    try:
        m.start_broker("node-a")
        m.brokers["node-b"] = m.start("broker", node="node-b",
                                      env={"MLX_STACK_EXPECT_MODELS": "late"})
        wait_for("the coordinator to know late", lambda: (s := m.status("node-a"))
                 and s.coordinating and "late" in s.known_models, timeout=20)
        url = m.gateway(node="node-b", healthy=False)  # no worker yet: /health is 503
        ask = {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json={**ask, "model": "never"},
                          timeout=10).status_code == 404
        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v1/chat/completions",
                                  json={**ask, "model": "late"}, timeout=30)
            wait_for("the request to wait at node-a",
                     lambda: m.status_says("node-a", lambda s: s.queues.get("late")), timeout=10)
            m.start("worker", "--engine", "synthetic", "--model", "late", node="node-b")
            assert pending.result(timeout=30).status_code == 200
    finally:
        m.close()


def test_brokers_find_each_other_over_mdns_without_configuration(tmp_path: Path) -> None:
    """mDNS pinned to loopback, no static peers: the three brokers discover each other and
    agree on the highest-priority one."""
    m = Mesh(tmp_path, NODES, env={"MLX_STACK_MDNS_INTERFACES": "127.0.0.1",
                                   "MLX_STACK_MESH_ID": f"test-{tmp_path.name}"})
    m.env["MLX_STACK_PEERS"] = ""
    try:
        for node in NODES:
            m.start_broker(node)
        coordinator = wait_for("one coordinator that found both peers over mDNS",
                               lambda: m.coordinator(peers=2), timeout=20)
        assert coordinator.node_id == "node-a"
        assert {p.node_id for p in coordinator.peers} == {"node-b", "node-c"}
        zc = Zeroconf(interfaces=["127.0.0.1"])
        try:
            def alias() -> ServiceInfo | None:
                info = zc.get_service_info(SERVICE, COORDINATOR, timeout=1000)
                return info if info and info.port == m.ports["node-a"] else None

            info = wait_for("the mlx-stack.local alias", alias, timeout=20)
            assert info.server == ALIAS
            assert info.parsed_addresses() == ["127.0.0.1"]
        finally:
            zc.close()
    finally:
        m.close()


def test_a_better_broker_joining_later_takes_over_after_the_hold_down(tmp_path: Path) -> None:
    """node-a (priority 2) starts while node-b coordinates under load: it stays standby
    for the hold-down, then takes over; every stream completes exactly."""
    hold = 3.0
    m = Mesh(tmp_path, NODES, env={"MLX_STACK_HOLD_DOWN": str(hold)})
    try:
        for node in ("node-b", "node-c"):
            m.start_broker(node)
        assert wait_for("node-b coordinating", m.coordinator, timeout=10).node_id == "node-b"
        for node in ("node-b", "node-c"):
            m.start("worker", "--engine", "synthetic", "--model", "syn", "--slots", "40",
                    "--rate", "20", node=node)
        url = m.gateway(node="node-c")
        n, tokens = 30, 120  # 6 s streams: the takeover happens in their middle
        roles: list[tuple[float, str]] = []

        async def main() -> list[ChatStream]:
            async with httpx.AsyncClient(timeout=60) as client:
                flowing = [asyncio.Event() for _ in range(n)]
                tasks = [asyncio.create_task(read_chat(client, url, failover_body(i, tokens),
                                                       flowing=flowing[i])) for i in range(n)]
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flowing)), 30)
                joined = time.monotonic()
                await asyncio.to_thread(m.start_broker, "node-a")  # the streams go on
                # Sampled until the streams end and node-a took over (on a slow machine
                # its start may take much of the streams' 6 s), within a bound.
                while not (all(t.done() for t in tasks)
                           and any(role == "coordinator" for _, role in roles)):
                    assert time.monotonic() - joined < 60, roles
                    status = await asyncio.to_thread(m.status, "node-a")
                    if status:
                        roles.append((time.monotonic() - joined, status.role))
                    await asyncio.sleep(0.2)
                return await asyncio.gather(*tasks)

        for i, stream in enumerate(asyncio.run(main())):
            assert stream.check().text == expected_text(f"failover {i}", tokens), i
        first_coordinating = next(t for t, role in roles if role == "coordinator")
        assert first_coordinating >= hold, roles  # no takeover before the hold-down
        assert all(role == "standby" for t, role in roles if t < hold)
        coordinator = wait_for("node-a coordinating", m.coordinator, timeout=10)
        assert coordinator.node_id == "node-a"
    finally:
        m.close()
