"""Three nodes as real hosts: network namespaces on a bridge, one node's full set of
processes in each, mDNS on the veth interfaces only, no configuration naming peers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import netns
from testkit.harness import ROOT, close_and_report, healthy, wait_for
from testkit.netns import HostMesh
from testkit.scenarios import NODES, kill_coordinator_under_streams, start_nodes

pytestmark = pytest.mark.skipif(netns.available() is not None,
                                reason=str(netns.available()))


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HostMesh]:
    """Three hosts; ``request.param`` "static" swaps mDNS for configured static peers."""
    with netns.Hosts(NODES) as hosts:
        m = HostMesh(tmp_path, hosts, mdns=getattr(request, "param", "mdns") == "mdns")
        try:
            m.start_brokers()
            yield m
        finally:
            close_and_report(m, request.node)


@pytest.mark.parametrize("mesh", ["mdns", "static"], indirect=True)
def test_hosts_discover_each_other_and_elect_one(mesh: HostMesh) -> None:
    coordinator = wait_for("one coordinator that knows both peers",
                           lambda: mesh.coordinator(peers=2), timeout=20)
    assert coordinator.node_id == "node-a"
    assert {p.node_id for p in coordinator.peers} == {"node-b", "node-c"}
    start_nodes(mesh)
    wait_for("all 6 workers at the coordinator",
             lambda: mesh.status_says("node-a", lambda s: len(s.workers) == 6), timeout=30)


def test_coordinator_host_killed_under_100_streams(mesh: HostMesh) -> None:
    wait_for("one coordinator over mDNS", lambda: mesh.coordinator(peers=2), timeout=20)
    urls = start_nodes(mesh)
    wait_for("all 6 workers at the coordinator",
             lambda: mesh.status_says("node-a", lambda s: len(s.workers) == 6), timeout=30)
    report = kill_coordinator_under_streams(
        mesh, [urls["node-b"], urls["node-c"]], streams=100, tokens=60)
    print("hosts: longest stall of a stream after the kill (heartbeat 0.5 s):", report)
    assert report["max_s"] <= 5.0, report
    coordinator = wait_for("a new coordinator", mesh.coordinator, timeout=10)
    assert coordinator.node_id == "node-b" and coordinator.epoch >= 2
    # A broker killed in mid-handshake is not a mesh secret that differs: no false hint.
    assert not [p.name for p in mesh.procs if "mesh enable --join" in p.output()]



CLIENT = """
import json, sys, time, httpx
url, seconds, key = sys.argv[1], float(sys.argv[2]), sys.argv[3]
results, end = [], time.monotonic() + seconds
with httpx.Client(timeout=60, headers={"Authorization": "Bearer " + key}) as client:
    while time.monotonic() < end:
        r = client.post(url + "/v1/chat/completions", json={"model": "syn", "max_tokens": 5,
                        "messages": [{"role": "user", "content": "hi"}]})
        results.append([r.status_code, r.headers.get("x-mlx-stack-node", "")])
print(json.dumps(results))
"""

ROLE = """
import sys
from mlx_stack.common.config import Settings
from mlx_stack.common.control import ControlClient
from mlx_stack.common.meshkeys import load_keys
settings = Settings.load()
status = ControlClient(sys.argv[1], settings, load_keys(settings.home)).ask("status")
print(status.role if status else "")
"""


def role_inside(mesh: HostMesh, node: str) -> str:
    """A broker's role, asked from inside its own host (which may be cut off)."""
    out = subprocess.run(mesh.hosts.exec_argv(node, [
        sys.executable, "-c", ROLE, mesh.broker_endpoint(node)]), capture_output=True,
        text=True, timeout=10, cwd=ROOT, env=mesh.env)
    return out.stdout.strip()


def test_a_cut_link_leaves_both_sides_serving_and_heals_to_one_coordinator(
        mesh: HostMesh) -> None:
    """Cut node-c's only link: node-c elects itself and serves its own clients with its
    own worker while node-a serves the others; restore it: one coordinator again. The
    clients run inside their hosts, before, during and after; none of their requests
    fails."""
    wait_for("one coordinator", lambda: mesh.coordinator(peers=2), timeout=20)
    start_nodes(mesh)
    wait_for("6 workers at node-a",
             lambda: mesh.status_says("node-a", lambda s: len(s.workers) == 6), timeout=30)

    def client(node: str, seconds: float) -> subprocess.Popen[str]:
        return subprocess.Popen(mesh.hosts.exec_argv(node, [
            sys.executable, "-c", CLIENT, mesh.gateway_url(node),
            str(seconds), mesh.keys.api_key]), stdout=subprocess.PIPE, text=True)

    clients = {node: client(node, 14) for node in ("node-a", "node-c")}
    mesh.hosts.link("node-c", up=False)
    wait_for("node-c coordinating its side", lambda: role_inside(mesh, "node-c") == "coordinator",
             timeout=15)
    wait_for("node-a coordinating its side too", lambda: mesh.status_says(
        "node-a", lambda s: s.role == "coordinator"), timeout=5)  # both sides have one
    apart = time.monotonic()
    wait_for("3 s apart", lambda: time.monotonic() - apart > 3, every=0.5)
    mesh.hosts.link("node-c", up=True)
    coordinator = wait_for("one coordinator again", mesh.coordinator, timeout=20)
    assert coordinator.node_id == "node-a"
    results = {node: json.loads(proc.communicate(timeout=90)[0])
               for node, proc in clients.items()}
    for node, served in results.items():
        assert served and all(code == 200 for code, _ in served), (node, served)
    assert "node-c" in {by for _, by in results["node-c"]}  # served on its own side
    assert {by for _, by in results["node-a"]} <= {"node-a", "node-b", "node-c"}


LAN_CLIENT = """
import json, sys, time, httpx
from zeroconf import AddressResolverIPv4, Zeroconf
interface, port, key = sys.argv[1], sys.argv[2], sys.argv[3]
zc = Zeroconf(interfaces=[interface])  # as a Mac's resolver: one cache, kept throughout

def resolve(other_than):
    end = time.monotonic() + 20
    while time.monotonic() < end:
        resolver = AddressResolverIPv4("mlx-stack.local.")
        resolver.request(zc, 1000)
        found = resolver.parsed_addresses()
        if found and found[0] != other_than:
            return found[0]
        time.sleep(0.1)
    return None

def ask(address, key):
    headers = {"Authorization": "Bearer " + key} if key else {}
    try:
        r = httpx.post("http://%s:%s/v1/chat/completions" % (address, port), timeout=30,
                       headers=headers, json={"model": "syn", "max_tokens": 3,
                       "messages": [{"role": "user", "content": "hi"}]})
        return [r.status_code, r.headers.get("x-mlx-stack-node", "")]
    except httpx.HTTPError as exc:
        return [0, repr(exc)]

previous = None
while sys.stdin.readline():  # each line: resolve the name anew (a new address), then ask
    address = resolve(previous)
    print(json.dumps({"address": address, "with_key": ask(address, key),
                      "without_key": ask(address, "")}), flush=True)
    previous = address
zc.close()
"""


def test_a_lan_client_reaches_the_mesh_at_mlx_stack_local_with_the_mesh_key(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A fourth host runs no node. It resolves ``mlx-stack.local`` over mDNS to the
    coordinator and is served there with the mesh's key (401 without). The coordinator's
    node is SIGKILLed: the same resolver, its cache kept, finds the new coordinator under
    the name (its announcement flushes the dead one's record) and is served there."""
    with netns.Hosts([*NODES, "client"]) as hosts:
        mesh = HostMesh(tmp_path, hosts)
        mesh.env["MLX_STACK_GATEWAY_HOST"] = "0.0.0.0"  # as `mlx-stack mesh enable` sets
        client = None
        try:
            mesh.start_brokers()
            wait_for("one coordinator", lambda: mesh.coordinator(peers=2), timeout=20)
            for node in NODES:
                mesh.start("worker", "--engine", "synthetic", "--model", "syn", node=node)
                mesh.start("gateway", "--port", "4000", node=node)
            for node in NODES:
                wait_for(f"gateway {node}", lambda n=node: healthy(mesh.gateway_url(n)),
                         timeout=30)
            client = subprocess.Popen(hosts.exec_argv("client", [
                sys.executable, "-c", LAN_CLIENT, hosts.addr["client"], "4000",
                mesh.keys.api_key]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True, cwd=ROOT, env=mesh.env)

            def turn() -> dict:
                client.stdin.write("go\n")
                client.stdin.flush()
                return json.loads(client.stdout.readline())

            first = turn()
            assert first["address"] == hosts.addr["node-a"], first
            assert first["with_key"][0] == 200 and first["without_key"][0] == 401, first
            for proc in mesh.procs:
                if proc.name.startswith("node-a-"):
                    proc.kill(signal.SIGKILL)
            second = turn()
            assert second["address"] == hosts.addr["node-b"], second
            assert second["with_key"] == [200, second["with_key"][1]], second
            assert second["without_key"][0] == 401, second
        finally:
            if client is not None:
                client.kill()
                client.wait(5)
            close_and_report(mesh, request.node)
