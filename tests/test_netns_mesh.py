"""Three nodes as real hosts: network namespaces on a bridge, one node's full set of
processes in each, mDNS on the veth interfaces only, no configuration naming peers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.harness import Mesh, Proc, close_and_report, wait_for
from tests.test_coordinator import HB, NODES, healthy, kill_coordinator_under_streams

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
            m.start_brokers()
            yield m
        finally:
            close_and_report(m, request.node)


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
    report = kill_coordinator_under_streams(
        mesh, [urls["node-b"], urls["node-c"]], streams=100, tokens=60)
    print("hosts: kill -> first resumed token (heartbeat 0.5 s):", report)
    assert report["max_s"] <= 5.0, report
    leader = wait_for("a new coordinator", mesh.coordinator, timeout=10)
    assert leader["node_id"] == "node-b" and leader["epoch"] >= 2
