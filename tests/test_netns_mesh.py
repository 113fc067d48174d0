"""Three nodes as real hosts: network namespaces on a bridge, one node's full set of
processes in each, mDNS on the veth interfaces only, no configuration naming peers."""

from __future__ import annotations

import asyncio
import itertools
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import netns
from tests.harness import Mesh, Proc, wait_for
from tests.test_coordinator import HB, NODES, healthy, stream
from tests.test_failover import expected_text

pytestmark = pytest.mark.skipif(netns.available() is not None,
                                reason=str(netns.available()))
PORT = 4100


class HostMesh(Mesh):
    """A Mesh whose nodes live in network namespaces and find each other over mDNS."""

    def __init__(self, tmp: Path, hosts: netns.Hosts) -> None:
        self.hosts = hosts
        super().__init__(tmp, NODES, env={"MLX_STACK_MESH_ID": f"netns-{tmp.name}",
                                          HB: "0.5"})
        self.env["MLX_STACK_PEERS"] = ""  # mDNS only

    def broker_endpoint(self, node: str) -> str:
        return f"tcp://{self.hosts.addr[node]}:{PORT}"

    def node_env(self, node: str) -> dict[str, str]:
        addr = self.hosts.addr[node]
        return {"MLX_STACK_BROKER_HOST": addr, "MLX_STACK_BROKER_PORT": str(PORT),
                "MLX_STACK_BROKER_ENDPOINT": self.broker_endpoint(node),
                "MLX_STACK_MDNS_INTERFACES": addr,
                "MLX_STACK_PRIORITY": str(self.priorities[node])}

    def start(self, role: str, *args: str, node: str = "node-a",
              env: dict[str, str] | None = None) -> Proc:
        name = f"{node}-{role}-{len(self.procs)}"
        argv = self.hosts.exec_argv(node, [sys.executable, "-m", "cli", role, *args])
        proc = Proc(name, argv, {**self.env, "MLX_STACK_NODE_ID": node,
                                 **self.node_env(node), **(env or {})},
                    self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def gateway_url(self, node: str) -> str:
        return f"http://{self.hosts.addr[node]}:4000"


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HostMesh]:
    with netns.Hosts(NODES) as hosts:
        m = HostMesh(tmp_path, hosts)
        try:
            for node in NODES:
                m.start_broker(node)
            yield m
        finally:
            m.close()
            if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
                print(m.logs())


def start_nodes(mesh: HostMesh) -> dict[str, str]:
    for node in NODES:
        for _ in range(2):
            mesh.start("worker", "--engine", "synthetic", "--model", "syn", "--slots", "40",
                       "--rate", "20", node=node)
        mesh.start("gateway", "--host", mesh.hosts.addr[node], "--port", "4000", node=node)
    urls = {node: mesh.gateway_url(node) for node in NODES}
    for node, url in urls.items():
        wait_for(f"gateway {node}", lambda u=url: healthy(u), timeout=30)
    return urls


def test_hosts_discover_each_other_and_elect_one(mesh: HostMesh) -> None:
    leader = wait_for("one coordinator over mDNS", mesh.coordinator, timeout=20)
    assert leader["node_id"] == "node-a"
    assert {p["node_id"] for p in leader["peers"]} == {"node-b", "node-c"}
    start_nodes(mesh)
    wait_for("all 6 workers at the coordinator",
             lambda: len(mesh.status("node-a")["workers"]) == 6, timeout=30)


def test_coordinator_host_killed_under_100_streams(mesh: HostMesh) -> None:
    wait_for("one coordinator over mDNS", mesh.coordinator, timeout=20)
    urls = start_nodes(mesh)
    wait_for("all 6 workers at the coordinator",
             lambda: len(mesh.status("node-a")["workers"]) == 6, timeout=30)
    tokens, n = 60, 100
    arrivals: list[list[float]] = [[] for _ in range(n)]
    killed: list[float] = []

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            flowing = [asyncio.Event() for _ in range(n)]
            tasks = [asyncio.create_task(stream(
                client, urls["node-b" if i % 2 else "node-c"], i, tokens, arrivals[i],
                flowing[i])) for i in range(n)]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flowing)), 60)
            mesh.brokers["node-a"].kill(signal.SIGKILL)
            killed.append(time.monotonic())
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)

    texts = asyncio.run(main())
    for i, text in enumerate(texts):
        assert text == expected_text(f"failover {i}", tokens), i
    leader = wait_for("a new coordinator", mesh.coordinator, timeout=10)
    assert leader["node_id"] == "node-b" and leader["epoch"] >= 2
    gaps = [max(itertools.pairwise(a), key=lambda pair: pair[1] - pair[0])[1] - killed[0]
            for a in ([t for t in arr if t > killed[0] - 0.2] for arr in arrivals)
            if len(a) > 1]
    report = {"streams": len(gaps), "median_s": round(statistics.median(gaps), 3),
              "max_s": round(max(gaps), 3)}
    print("hosts: kill -> first resumed token (heartbeat 0.5 s):", report)
    assert max(gaps) <= 5.0, report
