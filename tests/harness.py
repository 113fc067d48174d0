"""Real processes for tests: brokers, workers and gateways on loopback, always cleaned up.

Every role runs as ``python -m cli <role>`` (what ``mlx-stack up`` and launchd run), with
its own ``MLX_STACK_HOME`` and free ports, and its stderr captured to a file that a failing
test prints. Waiting is done on events (a CONTROL reply, ``/health``), each bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import zmq

from common import protocol as p

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


class Proc:
    """A role process; stderr goes to ``log``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(argv, env=env, stdout=self._log_file,
                                      stderr=subprocess.STDOUT, cwd=ROOT,
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
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        self.kill(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            code = self.popen.wait(5)
        self._log_file.close()
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Cluster:
    """One broker's world: the broker, workers and gateways of one or more nodes."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.broker_port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.broker_port}"
        self.env = {**os.environ, **FAST_HEARTBEAT, "MLX_STACK_HOME": str(tmp / "home"),
                    "MLX_STACK_BROKER_PORT": str(self.broker_port),
                    "MLX_STACK_BROKER_ENDPOINT": self.endpoint,
                    "MLX_STACK_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self.procs: list[Proc] = []
        self.ctx = zmq.Context()
        self._control: zmq.Socket | None = None

    def start(self, role: str, *args: str, node: str = "node-a",
              env: dict[str, str] | None = None) -> Proc:
        name = f"{role}-{len(self.procs)}"
        proc = Proc(name, [sys.executable, "-m", "cli", role, *args],
                    {**self.env, "MLX_STACK_NODE_ID": node, **(env or {})},
                    self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def broker(self, env: dict[str, str] | None = None) -> Proc:
        proc = self.start("broker", env=env)
        wait_for("the broker to answer", lambda: self.try_control("status"))
        return proc

    def worker(self, *args: str, node: str = "node-a", wait: bool = True) -> Proc:
        """Start a worker; with ``wait``, return once the broker has registered it."""
        before = {w["worker_id"] for w in self.workers()}
        proc = self.start("worker", *args, node=node)

        def registered() -> set[str]:
            if not proc.alive():
                raise AssertionError(f"the worker exited:\n{proc.output()}")
            return {w["worker_id"] for w in self.workers()} - before

        if wait:
            wait_for(f"worker {args} to register", registered, timeout=120)
        return proc

    def gateway(self, *args: str, node: str = "node-a",
                env: dict[str, str] | None = None) -> str:
        """Start a gateway (``args``: extra flags); return its base URL once it is healthy."""
        port = free_port()
        proc = self.start("gateway", "--port", str(port), *args, node=node, env=env)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if not proc.alive():
                raise AssertionError(proc.output())
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the gateway to be healthy", healthy, timeout=60)
        return url

    # ----------------------------------------------------------------- control

    def control(self, op: str, **args: Any) -> Any:
        result = self.try_control(op, **args)
        if result is None:
            raise AssertionError(f"the broker did not answer CONTROL {op}")
        return result

    def try_control(self, op: str, timeout: float = 2.0, **args: Any) -> Any:
        """Send a CONTROL as a gateway would; None if no reply within ``timeout``."""
        if self._control is None:
            self._control = self.ctx.socket(zmq.DEALER)
            self._control.setsockopt(zmq.LINGER, 0)
            self._control.connect(self.endpoint)
        request_id = uuid.uuid4().hex
        self._control.send_multipart(p.encode(p.GATEWAY, p.Control(
            request_id=request_id, op=op, args=args)))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self._control.poll(left * 1000):
                break
            _, msg = p.decode(self._control.recv_multipart(), p.FROM_BROKER)
            if isinstance(msg, p.ControlReply) and msg.request_id == request_id:
                return msg.result
        return None

    def workers(self) -> list[dict[str, Any]]:
        status = self.try_control("status")
        return status["workers"] if status else []

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        if self._control is not None:
            self._control.close(0)
        self.ctx.term()

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
                 env: dict[str, str] | None = None) -> None:
        super().__init__(tmp, env)
        self.ports = {node: free_port() for node in priorities}
        self.priorities = priorities
        self.env["MLX_STACK_PEERS"] = ",".join(self.broker_endpoint(n) for n in priorities)
        self.brokers: dict[str, Proc] = {}
        self._sockets: dict[str, zmq.Socket] = {}

    def broker_endpoint(self, node: str) -> str:
        return f"tcp://127.0.0.1:{self.ports[node]}"

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

    def status(self, node: str, timeout: float = 1.0) -> dict[str, Any] | None:
        """CONTROL status of one node's broker (None if it does not answer)."""
        sock = self._sockets.get(node)
        if sock is None:
            sock = self._sockets[node] = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.broker_endpoint(node))
        request_id = uuid.uuid4().hex
        sock.send_multipart(p.encode(p.GATEWAY, p.Control(request_id=request_id, op="status")))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and sock.poll(left * 1000):
            _, msg = p.decode(sock.recv_multipart(), p.FROM_BROKER)
            if isinstance(msg, p.ControlReply) and msg.request_id == request_id:
                return msg.result
        return None

    def coordinator(self) -> dict[str, Any] | None:
        """The one active broker's status, if exactly one live broker says it is active
        and every other live broker follows it."""
        statuses = [s for n, proc in self.brokers.items()
                    if proc.alive() and (s := self.status(n))]
        active = [s for s in statuses if s["role"] == "active"]
        if len(active) != 1:
            return None
        leader = active[0]["endpoint"]
        return active[0] if all(s["leader"] == leader for s in statuses) else None

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(0)
        super().close()
