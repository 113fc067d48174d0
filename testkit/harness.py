"""Real processes for tests and benchmarks: brokers, workers and gateways on loopback,
always cleaned up.

Every role runs as ``python -m mlx_stack.cli <role>`` (what ``mlx-stack up`` and launchd
run), with its own ``MLX_STACK_HOME`` and free ports, and its stderr captured to a file
that a failing test prints. Waiting is done on events (a CONTROL reply, ``/health``), each bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import zmq

from mlx_stack.common.config import Settings
from mlx_stack.common.control import ControlClient
from mlx_stack.common.meshkeys import MeshKeys, save_secret
from mlx_stack.common.status import BrokerStatus, WorkerStatus

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
FAST_HEARTBEAT = {"MLX_STACK_HEARTBEAT_INTERVAL": "0.2", "MLX_STACK_HEARTBEAT_LIVENESS": "3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 30.0,
             every: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def healthy(url: str) -> bool:
    """Whether the gateway at ``url`` says it can serve (``/health`` 200): a condition
    for :func:`wait_for`, false while it does not answer at all."""
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def role_command(root: Path, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """How to run the roles of the source tree ``root``: the command, and the environment
    it needs. This checkout's roles are installed (``mlx_stack.*``, editable); another
    tree's are found first through a ``mlx_stack`` package in ``tmp`` whose path is that
    tree. A tree from before the roles moved under ``mlx_stack`` runs ``python -m cli``
    from its own directory."""
    if root == ROOT:
        return [sys.executable, "-m", "mlx_stack.cli"], {}
    if '"mlx_stack.cli" = "cli"' not in (root / "pyproject.toml").read_text():
        return [sys.executable, "-m", "cli"], {}
    package = tmp / "source" / "mlx_stack"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f"__path__ = [{str(root)!r}]\n")
    return [sys.executable, "-m", "mlx_stack.cli"], {"PYTHONPATH": str(package.parent)}


class Proc:
    """A role process run from the tree ``root``; stderr goes to ``log``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path,
                 root: Path = ROOT) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(argv, env=env, stdout=self._log_file,
                                      stderr=subprocess.STDOUT, cwd=root,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code. A process that
        had to be killed cannot stop its children: they are killed too (``mlx-stack up``
        starts each role in a session of its own, out of reach of a signal to its group).
        After a clean exit they are left alone, so a test can see whether it stopped them."""
        children = self.children()
        self.kill(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            code = self.popen.wait(5)
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()
            psutil.wait_procs(children, timeout=5)
        self._log_file.close()
        return code

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``mlx-stack ARGS`` as a user runs it; output captured, bounded in time."""
    return subprocess.run([sys.executable, "-m", "mlx_stack.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          # Tables unwrapped, whatever COLUMNS the environment says
                          # (pytest-xdist's workers say 80, and a Cluster's env copies it).
                          env={**os.environ, **(env or {}), "COLUMNS": "200"})


class Cluster:
    """One broker's world: the broker, workers and gateways of one or more nodes."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None,
                 secret: bytes | None = None, root: Path = ROOT) -> None:
        """``secret``: the mesh secret every process of this cluster holds (None: none,
        plain ZeroMQ on loopback). ``root``: the source tree its roles run from
        (:func:`role_command`; ``bench.ab_commits`` runs two commits side by side)."""
        self.tmp = tmp
        self.root = root
        tmp.mkdir(parents=True, exist_ok=True)
        self.keys = MeshKeys.from_secret(secret) if secret else None
        if secret:
            save_secret(tmp / "home", secret)
        self.broker_port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.broker_port}"
        self.env = {**os.environ, **FAST_HEARTBEAT, "MLX_STACK_HOME": str(tmp / "home"),
                    "MLX_STACK_BROKER_PORT": str(self.broker_port),
                    "MLX_STACK_BROKER_ENDPOINT": self.endpoint,
                    "MLX_STACK_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self.procs: list[Proc] = []
        self.ctx = zmq.Context()
        self._controls: dict[str, ControlClient] = {}

    def start(self, role: str, *args: str, node: str = "node-a",
              env: dict[str, str] | None = None) -> Proc:
        name = f"{role}-{len(self.procs)}"
        argv, source = role_command(self.root, self.tmp)
        proc = Proc(name, [*argv, role, *args],
                    {**self.env, **source, "MLX_STACK_NODE_ID": node, **(env or {})},
                    self.tmp / f"{name}.log", self.root)
        self.procs.append(proc)
        return proc

    def broker(self, env: dict[str, str] | None = None) -> Proc:
        proc = self.start("broker", env=env)
        wait_for("the broker to answer", lambda: self.try_control("status"))
        return proc

    def worker(self, *args: str, node: str = "node-a", wait: bool = True,
               env: dict[str, str] | None = None) -> Proc:
        """Start a worker; with ``wait``, return once the broker has registered it."""
        before = {w.worker_id for w in self.workers()}
        proc = self.start("worker", *args, node=node, env=env)

        def registered() -> set[str]:
            if not proc.alive():
                raise AssertionError(f"the worker exited:\n{proc.output()}")
            return {w.worker_id for w in self.workers()} - before

        if wait:
            wait_for(f"worker {args} to register", registered, timeout=120)
        return proc

    def gateway(self, *args: str, node: str = "node-a", env: dict[str, str] | None = None,
                healthy: bool = True) -> str:
        """Start a gateway (``args``: extra flags); return its base URL once it is healthy
        (``/health`` 200: it reaches a broker that serves a model), or with ``healthy``
        false, once it answers HTTP at all."""
        port = free_port()
        proc = self.start("gateway", "--port", str(port), *args, node=node, env=env)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(proc.output())
            try:
                status = httpx.get(f"{url}/health", timeout=5).status_code
            except httpx.HTTPError:
                return False
            return status == 200 or not healthy

        wait_for("the gateway to be healthy" if healthy else "the gateway to answer", ready,
                 timeout=60)
        return url

    # ----------------------------------------------------------------- control

    def control(self, op: str, **args: Any) -> Any:
        result = self.try_control(op, **args)
        if result is None:
            raise AssertionError(f"the broker did not answer CONTROL {op}")
        return result

    def try_control(self, op: str, timeout: float = 2.0, endpoint: str = "",
                    **args: Any) -> Any:
        """Send a CONTROL as a gateway would (to this cluster's broker, or ``endpoint``);
        None if no reply within ``timeout``."""
        endpoint = endpoint or self.endpoint
        client = self._controls.get(endpoint)
        if client is None:
            client = self._controls[endpoint] = ControlClient(
                endpoint, Settings.load(home=self.tmp / "home"), self.keys, self.ctx)
        return client.ask(op, timeout, **args)

    @property
    def auth(self) -> dict[str, str]:
        """Headers of a client from the network: the mesh's key, if it has a secret
        (a gateway asks it of every client beyond loopback)."""
        return {"Authorization": f"Bearer {self.keys.api_key}"} if self.keys else {}

    def workers(self) -> list[WorkerStatus]:
        status = self.try_control("status")
        return status.workers if status else []

    def counters_when(self, ready: Callable[[WorkerStatus], object],
                      worker_id: str | None = None) -> dict[str, int]:
        """The counters of worker ``worker_id`` (else the first one) once its status
        passes ``ready``. Counters reach the broker in heartbeats: a read right after a
        stream ends may show the worker as it was before the stream."""
        def check() -> tuple[dict[str, int]] | None:  # a tuple: counters may be {}
            worker = next((w for w in self.workers()
                           if worker_id is None or w.worker_id == worker_id), None)
            return (worker.load.counters,) if worker is not None and ready(worker) else None

        return wait_for("the worker's counters", check, timeout=10)[0]

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for client in self._controls.values():
            client.close()
        # destroy, not term: a socket a failed test left open would make term() wait for
        # it until the pytest timeout.
        self.ctx.destroy(linger=0)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} (pid {p.pid})\n{p.output()[-4000:]}"
                         for p in self.procs)



def close_and_report(cluster: Cluster, item: Any) -> None:
    """Stop a cluster's processes; print their logs if the test (``item``) failed."""
    failed = any(getattr(item, f"rep_{when}", None) and getattr(item, f"rep_{when}").failed
                 for when in ("setup", "call"))
    cluster.close()
    if failed:
        print(cluster.logs())


class Mesh(Cluster):
    """Several nodes on loopback, each with its own broker; the brokers know each other
    as static peers and elect a coordinator. ``priorities`` maps node -> priority."""

    def __init__(self, tmp: Path, priorities: dict[str, int],
                 env: dict[str, str] | None = None, secret: bytes | None = None) -> None:
        super().__init__(tmp, env, secret)
        self.ports = {node: free_port() for node in priorities}
        self.priorities = priorities
        self.env["MLX_STACK_PEERS"] = ",".join(self.broker_endpoint(n) for n in priorities)
        self.brokers: dict[str, Proc] = {}

    def broker_endpoint(self, node: str) -> str:
        return f"tcp://127.0.0.1:{self.ports[node]}"

    def start_gateway(self, node: str) -> str:
        """Start ``node``'s gateway; its URL, at once (:func:`healthy` tells when it
        serves: several gateways start side by side)."""
        port = free_port()
        self.start("gateway", "--port", str(port), node=node)
        return f"http://127.0.0.1:{port}"

    def node_env(self, node: str) -> dict[str, str]:
        return {"MLX_STACK_BROKER_PORT": str(self.ports[node]),
                "MLX_STACK_BROKER_ENDPOINT": self.broker_endpoint(node),
                "MLX_STACK_PRIORITY": str(self.priorities[node])}

    def start(self, role: str, *args: str, node: str = "node-a",
              env: dict[str, str] | None = None) -> Proc:
        return super().start(role, *args, node=node, env={**self.node_env(node), **(env or {})})

    def start_brokers(self) -> None:
        for node in self.priorities:
            self.start_broker(node)

    def start_broker(self, node: str) -> Proc:
        self.brokers[node] = self.start("broker", node=node)
        wait_for(f"broker {node}", lambda: self.status(node))
        return self.brokers[node]

    def status(self, node: str, timeout: float = 1.0) -> BrokerStatus | None:
        """CONTROL status of one node's broker (None if it does not answer)."""
        return self.try_control("status", timeout, endpoint=self.broker_endpoint(node))

    def answered_status(self, node: str, timeout: float = 10.0) -> BrokerStatus:
        """``node``'s broker's status, asked until it answers (a broker slow under load
        is not a failed test); the test fails after ``timeout``."""
        return wait_for(f"{node}'s broker to answer", lambda: self.status(node), timeout)

    def status_says(self, node: str, check: Callable[[BrokerStatus], object]) -> bool:
        """Whether ``node``'s broker answers and its status passes ``check``: a condition
        for :func:`wait_for`, where a broker slow to answer under load is "not yet", not
        an AttributeError on None that fails the test."""
        status = self.status(node)
        return status is not None and bool(check(status))

    def coordinator(self, peers: int | None = None) -> BrokerStatus | None:
        """The coordinator's status, if every live broker answers, exactly one says it
        coordinates and every other follows it. With ``peers``, only once each of them
        also knows that many peers: a broker may coordinate, and another follow it,
        before mDNS has shown them every other host."""
        statuses = [self.status(n) for n, proc in self.brokers.items() if proc.alive()]
        if None in statuses:  # a live broker slow to answer may still coordinate
            return None
        coordinators = [s for s in statuses if s.coordinating]
        if len(coordinators) != 1 or (
                peers is not None and any(len(s.peers) != peers for s in statuses)):
            return None
        endpoint = coordinators[0].endpoint
        return coordinators[0] if all(s.coordinator == endpoint for s in statuses) else None

