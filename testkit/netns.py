"""Hosts for tests and benchmarks: network namespaces on a bridge, created and always
removed; packet loss on a host's link (:func:`drop`, nftables inside its namespace: the
kernel here has no netem); and :class:`HostMesh`, a mesh with one node on each.

Layout: a bridge in a namespace of its own; one namespace per node, joined to the bridge
by a veth pair (10.<net>.0.<i>/24); and one veth from the test's own namespace to the
bridge (10.<net>.0.254), so that the test process can reach the nodes' gateways. Nothing
touches the machine's real interfaces.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from mlx_stack.common.meshkeys import new_secret
from testkit.harness import Mesh, Proc
from testkit.scenarios import NODES


def available() -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hosts:
    """``names`` as hosts on one bridge; use as a context manager."""

    def __init__(self, names: Iterable[str]) -> None:
        self.prefix = f"mx{os.getpid()}"
        self.net = 0
        """The second byte of the hosts' 10.<net>.0.0/24, chosen when they are created."""
        self.names = list(names)
        self.ns = {name: f"{self.prefix}-{i}" for i, name in enumerate(self.names)}
        self.addr: dict[str, str] = {}
        self.bridge_ns = f"{self.prefix}-br"
        self.host_if = f"{self.prefix}h"

    def __enter__(self) -> Hosts:
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _create(self) -> None:
        remove_stale()
        self.net = free_net(os.getpid())
        self.addr = {name: f"10.{self.net}.0.{i + 1}" for i, name in enumerate(self.names)}
        br = self.bridge_ns
        ip("netns", "add", br)
        ip("-n", br, "link", "add", "br0", "type", "bridge")
        ip("-n", br, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ns, inner, outer = self.ns[name], f"{self.prefix}v{i}", f"{self.prefix}b{i}"
            ip("netns", "add", ns)
            ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            ip("link", "set", inner, "netns", ns, "name", "eth0")
            ip("link", "set", outer, "netns", br)
            ip("-n", br, "link", "set", outer, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.addr[name]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        outer = f"{self.prefix}bh"
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", outer)
        ip("link", "set", outer, "netns", br)
        ip("-n", br, "link", "set", outer, "master", "br0", "up")
        ip("addr", "add", f"10.{self.net}.0.254/24", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")

    def link(self, name: str, up: bool) -> None:
        """Cut (or restore) a host's only link: its veth in the bridge namespace."""
        i = self.names.index(name)
        ip("-n", self.bridge_ns, "link", "set", f"{self.prefix}b{i}", "up" if up else "down")

    def exec_argv(self, name: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name], *argv]

    def remove(self) -> None:
        for ns in [*self.ns.values(), self.bridge_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)


def free_net(start: int) -> int:
    """The first of 10.200-249.0.0/24, from ``start`` on, that no route here uses: another
    run's hosts (pytest-xdist runs two modules at once) keep theirs."""
    routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True,
                            timeout=10).stdout
    for k in range(50):
        net = 200 + (start + k) % 50
        if f"10.{net}.0.0/24" not in routes:
            return net
    raise RuntimeError("every 10.200-249.0.0/24 is routed already: remove stale test "
                       "namespaces (`ip netns list`, `ip netns del mx...`)")


def remove_stale() -> None:
    """Remove the namespaces and host links of test runs whose process is gone (killed
    before it could clean up): their routes would shadow a new run's addresses."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=10).stdout + subprocess.run(
        ["ip", "-br", "link"], capture_output=True, text=True, timeout=10).stdout
    for name, pid in set(re.findall(r"^(mx(\d+)(?:-\w+|h))\b", listed, re.MULTILINE)):
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            kind = ["link", "del"] if name.endswith("h") else ["netns", "del"]
            subprocess.run(["ip", *kind, name], capture_output=True, timeout=10)
        except PermissionError:  # alive, another user's
            pass


def nft(hosts: Hosts, node: str, script: str) -> None:
    """Run an nftables ``script`` inside ``node``'s namespace."""
    subprocess.run(hosts.exec_argv(node, ["nft", "-f", "-"]), input=script, text=True,
                   check=True, capture_output=True, timeout=10)


def drop(hosts: Hosts, node: str, percent: int) -> int:
    """Drop ``percent`` % of the packets ``node`` receives and sends (100: all of them);
    0 removes the rules. Returns how many packets the rules it replaced dropped (the
    proof that a fault struck)."""
    listed = subprocess.run(hosts.exec_argv(node, ["nft", "list", "table", "inet", "links"]),
                            capture_output=True, text=True, timeout=10).stdout
    dropped = sum(int(n) for n in re.findall(r"counter packets (\d+)", listed))
    nft(hosts, node, "table inet links\ndelete table inet links\n")
    if percent:
        verdict = "counter drop" if percent >= 100 else (
            f"numgen random mod 100 < {percent} counter drop")
        nft(hosts, node, f"""table inet links {{
            chain input {{ type filter hook input priority 0; policy accept; {verdict}; }}
            chain output {{ type filter hook output priority 0; policy accept; {verdict}; }}
        }}""")
    return dropped


PORT = 4100
"""Every host's broker port (each host has an address of its own)."""
GATEWAY_PORT = 4000


class HostMesh(Mesh):
    """A Mesh whose nodes live in network namespaces and find each other over mDNS."""

    def __init__(self, tmp: Path, hosts: Hosts, mdns: bool = True) -> None:
        self.hosts = hosts
        self.mdns = mdns
        # Hosts on a network: the mesh secret is required (and its id keeps mDNS private).
        super().__init__(tmp, NODES, env={"MLX_STACK_HEARTBEAT_INTERVAL": "0.5"},
                         secret=new_secret())
        if mdns:
            self.env["MLX_STACK_PEERS"] = ""  # found over mDNS alone

    def broker_endpoint(self, node: str) -> str:
        return f"tcp://{self.hosts.addr[node]}:{PORT}"

    def node_env(self, node: str) -> dict[str, str]:
        addr = self.hosts.addr[node]
        return {"MLX_STACK_BROKER_HOST": addr, "MLX_STACK_BROKER_PORT": str(PORT),
                "MLX_STACK_BROKER_ENDPOINT": self.broker_endpoint(node),
                "MLX_STACK_MDNS_INTERFACES": addr if self.mdns else "",
                "MLX_STACK_PRIORITY": str(self.priorities[node])}

    def start(self, role: str, *args: str, node: str = "node-a",
              env: dict[str, str] | None = None) -> Proc:
        name = f"{node}-{role}-{len(self.procs)}"
        argv = self.hosts.exec_argv(node, [sys.executable, "-m", "mlx_stack.cli", role, *args])
        proc = Proc(name, argv, {**self.env, "MLX_STACK_NODE_ID": node,
                                 **self.node_env(node), **(env or {})},
                    self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def gateway_url(self, node: str) -> str:
        return f"http://{self.hosts.addr[node]}:{GATEWAY_PORT}"

    def start_gateway(self, node: str) -> str:
        self.start("gateway", "--host", self.hosts.addr[node], "--port", str(GATEWAY_PORT),
                   node=node)
        return self.gateway_url(node)
