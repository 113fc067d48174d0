"""The mesh secret keeps strangers out, and the gateway's API keys keep clients honest.

Real brokers, workers and gateways on loopback: a broker with a foreign secret or none
that claims the highest priority, a worker without the secret, a client that knows the
public key but not the secret, and a byte-level capture of what crosses the broker port.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import zmq
from zeroconf import ServiceInfo, Zeroconf

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.config import Settings
from mlx_stack.common.control import ControlClient
from mlx_stack.common.discovery import SERVICE
from mlx_stack.common.meshkeys import MeshKeys, load_keys, new_secret, save_secret
from mlx_stack.common.status import BrokerStatus
from mlx_stack.gateway.auth import exposure_warning
from testkit.harness import Cluster, Mesh, close_and_report, free_port, wait_for

SYN = ("--engine", "synthetic", "--model", "syn", "--slots", "8", "--rate", "500")
PROMPT = "the-secret-plan-is-purple-elephants"


def chat(url: str, key: str = "none", prompt: str = "hi") -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=20, max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="syn", max_tokens=5, messages=[{"role": "user", "content": prompt}])


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """node-a and node-b share a secret; rogue-x (foreign secret) and rogue-y (none) sit
    in everybody's static peers with the highest priority."""
    m = Mesh(tmp_path, {"node-a": 1, "node-b": 0, "rogue-x": 100, "rogue-y": 99},
             secret=new_secret())
    try:
        yield m
    finally:
        close_and_report(m, request.node)


def rogue_home(tmp: Path, name: str, secret: bytes | None) -> dict[str, str]:
    home = tmp / name
    home.mkdir()
    if secret:
        save_secret(home, secret)
    return {"MLX_STACK_HOME": str(home)}


def test_strangers_cannot_coordinate_serve_or_register(mesh: Mesh, tmp_path: Path) -> None:
    rogues = {"rogue-x": rogue_home(tmp_path, "rogue-x", new_secret()),
              "rogue-y": rogue_home(tmp_path, "rogue-y", None)}
    for node, env in rogues.items():
        mesh.start("broker", node=node, env=env)  # not a member: not in mesh.brokers
        # Each rogue serves a worker under the same model name, to catch a misrouted job.
        mesh.start("worker", *SYN, node=node, env=env)
    mesh.start_broker("node-a")
    mesh.start_broker("node-b")
    mesh.start("worker", *SYN, node="node-a")
    mesh.start("worker", *SYN, node="node-b")
    url = mesh.gateway(node="node-b")

    coordinator = wait_for("node-a to coordinate", mesh.coordinator, timeout=20)
    assert coordinator.node_id == "node-a"
    wait_for("both members' workers",
             lambda: mesh.status_says("node-a", lambda s: len(s.workers) == 2), timeout=30)
    # The rogues are in every member's static peers: their attempts are refused.
    wait_for("member brokers to refuse the rogues", lambda: all(
        mesh.status_says(n, lambda s: s.counters.get("handshake_refused", 0) > 0)
        for n in ("node-a", "node-b")), timeout=20)

    served = {chat(url).headers["x-mlx-stack-node"] for _ in range(20)}
    assert served <= {"node-a", "node-b"}

    for node in ("node-a", "node-b"):
        status = mesh.answered_status(node)
        assert {p.node_id for p in status.peers} <= {"node-a", "node-b"}, status
        assert all(w.node_id in ("node-a", "node-b") for w in status.workers)
    for node, env in rogues.items():
        settings = Settings.load(home=Path(env["MLX_STACK_HOME"]))
        rogue = ControlClient(mesh.broker_endpoint(node), settings,
                              load_keys(settings.home), mesh.ctx)

        def own_worker(rogue: ControlClient = rogue) -> BrokerStatus | None:
            status = rogue.ask("status")
            return status if status and status.workers else None

        try:
            status = wait_for(f"{node}'s own worker", own_worker, timeout=30)
            routes = rogue.ask("routes", timeout=10)
        finally:
            rogue.close()
        # Alone in their own "meshes": no member peer, no job, only their own worker.
        assert status.peers == [] and routes == [], status
        assert [w.node_id for w in status.workers] == [node]


def test_a_worker_without_the_secret_cannot_register(cluster_with_secret: Cluster,
                                                     tmp_path: Path) -> None:
    c = cluster_with_secret
    for name, secret in (("no-secret", None), ("foreign", new_secret())):
        refused = c.control("status").counters.get("handshake_refused", 0)
        worker = c.start("worker", *SYN, node=name, env=rogue_home(tmp_path, name, secret))
        wait_for(f"the broker to refuse the {name} worker", lambda r=refused: c.control(
            "status").counters.get("handshake_refused", 0) > r, timeout=20)
        # ... and the worker says why, and what to do.
        wait_for(f"the {name} worker to explain", lambda w=worker: "mesh enable --join" in
                 w.output(), timeout=20)
    c.worker(*SYN, node="member")  # a member registers through the same port meanwhile
    assert [w.node_id for w in c.workers()] == ["member"]


def test_zap_turns_away_a_client_that_knows_only_the_public_key(
        cluster_with_secret: Cluster) -> None:
    c = cluster_with_secret
    assert c.keys is not None
    sock = c.ctx.socket(zmq.DEALER)
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()  # its own key pair
    sock.curve_serverkey = c.keys.public  # the server's key, as if it had leaked
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(c.endpoint)
    try:
        sock.send_multipart(wire.encode(wire.GATEWAY, msgs.Control(request_id="x", op="status")))
        wait_for("ZAP to refuse the impostor", lambda: c.control("status").counters.get(
            "handshake_refused", 0) >= 1, timeout=10)
        assert not sock.poll(500)  # and nothing came back to it
    finally:
        sock.close(0)


@pytest.fixture
def cluster_with_secret(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "mesh", secret=new_secret())
    try:
        c.broker()
        yield c
    finally:
        close_and_report(c, request.node)


class Tap:
    """A TCP relay that keeps every byte it forwards: what someone on the wire would see."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target = target_port
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("secret", [None, b"s" * 32], ids=["plain", "curve"])
def test_broker_traffic_on_the_wire_hides_prompts(tmp_path: Path, secret: bytes | None,
                                                  request: pytest.FixtureRequest) -> None:
    """Worker and gateway reach the broker through a tap. Without a secret the prompt is
    there in clear (so the tap does see the traffic); with one it never is."""
    c = Cluster(tmp_path, secret=secret)
    tap = Tap(c.broker_port)
    through_tap = {"MLX_STACK_BROKER_ENDPOINT": f"tcp://127.0.0.1:{tap.port}"}
    try:
        c.broker()
        c.worker(*SYN, env=through_tap)
        url = c.gateway(env=through_tap)
        reply = chat(url, prompt=PROMPT).parse()
        assert reply.choices[0].message.content
        with tap.lock:
            wire = bytes(tap.captured)
        assert len(wire) > 1000
        assert (PROMPT.encode() in wire) == (secret is None)
    finally:
        tap.close()
        close_and_report(c, request.node)


def test_api_keys(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    c = Cluster(tmp_path, env={"MLX_STACK_API_KEYS": "key-one, key-two"})
    try:
        c.broker()
        c.worker(*SYN)
        url = c.gateway()
        assert chat(url, key="key-two").parse().choices[0].message.content
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
            r = httpx.post(f"{url}/v1/chat/completions", headers=headers, json={
                "model": "syn", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            chat(url, key="key-three")
        assert httpx.get(f"{url}/v1/models", headers={
            "Authorization": "Bearer key-one"}).status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # for probes: no key needed
    finally:
        close_and_report(c, request.node)


def test_gateway_warns_when_exposed_without_a_key() -> None:
    exposed = Settings(gateway_host="0.0.0.0")
    assert "without an API key" in (exposure_warning(exposed, None) or "")
    assert exposure_warning(Settings(gateway_host="0.0.0.0", api_keys="k"), None) is None
    assert exposure_warning(Settings(gateway_host="127.0.0.1"), None) is None
    # With the mesh enabled a LAN client needs the mesh's key: not exposed.
    assert exposure_warning(exposed, MeshKeys.from_secret(new_secret())) is None


def test_the_mesh_key_is_derived_from_the_secret() -> None:
    secret = new_secret()
    key = MeshKeys.from_secret(secret).api_key
    assert key == MeshKeys.from_secret(secret).api_key  # every node derives the same
    assert key != MeshKeys.from_secret(new_secret()).api_key
    assert key.startswith("mlxs-key-") and secret.hex() not in key


def test_broker_refuses_the_network_without_a_secret(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        # 127.0.0.2 is loopback (allowed); a routable address would need the secret. An
        # address no interface has fails at the check before any bind is tried.
        proc = c.start("broker", env={"MLX_STACK_BROKER_HOST": "192.0.2.1"})
        assert proc.popen.wait(30) != 0
        assert "mlx-stack mesh enable" in proc.output()
    finally:
        c.close()


def test_meshes_sharing_a_lan_do_not_see_each_other_over_mdns(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """mDNS on loopback, no static peers: node-a and node-b (one secret) find each other;
    node-c (another secret, top priority) is visible on the LAN yet stays alone."""
    m = Mesh(tmp_path, {"node-a": 1, "node-b": 0, "node-c": 5}, secret=new_secret(),
             env={"MLX_STACK_MDNS_INTERFACES": "127.0.0.1"})
    m.env["MLX_STACK_PEERS"] = ""
    other = new_secret()
    zc = Zeroconf(interfaces=["127.0.0.1"])
    try:
        m.start("broker", node="node-c",  # another mesh's: not in m.brokers
                env=rogue_home(tmp_path, "other-mesh", other))
        m.start_broker("node-a")
        m.start_broker("node-b")
        coordinator = wait_for("node-a and node-b to find each other",
                               lambda: m.coordinator(peers=1), timeout=20)
        assert coordinator.node_id == "node-a"
        assert [p.node_id for p in coordinator.peers] == ["node-b"]

        def advert_of_c() -> ServiceInfo | None:
            return zc.get_service_info(SERVICE, f"node-c.{SERVICE}", timeout=1000)

        info = wait_for("node-c's mDNS record", advert_of_c, timeout=20)
        assert info.properties[b"mesh"].decode() == MeshKeys.from_secret(other).mesh_id
        assert info.properties[b"mesh"].decode() != m.keys.mesh_id  # type: ignore[union-attr]
        status = m.answered_status("node-a")
        assert "node-c" not in {p.node_id for p in status.peers}
    finally:
        zc.close()
        close_and_report(m, request.node)
