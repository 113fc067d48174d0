"""The systems ``bench.vs_litellm`` compares, and the timing they share: synthetic HTTP
backends, meshes of synthetic workers and LiteLLM's proxy (in a virtual environment of
its own, made once), each started here and every one stopped by :meth:`Systems.close`;
and the CPU time their processes spent.

Why a module of its own: starting and stopping what is measured is apart from the
measuring (``bench.vs_litellm_phases``); ``bench.ab_commits`` and ``bench.c32_tail`` start
the same systems with the same timing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from testkit.harness import Cluster, Proc, free_port, wait_for

LITELLM = "1.108.0"
"""The LiteLLM release compared with (its proxy extra resolves from PyPI here)."""
VENV = Path.home() / ".cache" / "mlx-stack" / f"litellm-{LITELLM}"
RATE, TTFT, SLOTS, BACKENDS = 50.0, 0.02, 32, 3
TOKENS = 8
"""Tokens per request in the latency phase: time to first token is what it measures."""
STRATEGIES = ("simple-shuffle", "least-busy")


def comparison_venv() -> Path:
    """The virtual environment with LiteLLM's proxy and matplotlib (made once)."""
    python = VENV / "bin" / "python"
    if not (VENV / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", f"litellm[proxy]=={LITELLM}",
                        "matplotlib"], check=True, timeout=900)
        (VENV / ".ready").touch()
    return python


class Systems:
    """Starts backends, meshes and LiteLLM proxies, and stops every one of them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cluster = Cluster(tmp / "procs")
        self.meshes: list[Cluster] = []

    def backend(self) -> tuple[str, Proc]:
        port = free_port()
        proc = Proc(f"backend-{port}", [sys.executable, "-m", "bench.http_backend", "--port",
                                        str(port), "--rate", str(RATE), "--ttft", str(TTFT),
                                        "--slots", str(SLOTS)],
                    self.cluster.env, self.tmp / f"backend-{port}.log")
        self.cluster.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for("a backend", lambda: _answers(f"{url}/stats"), timeout=30)
        return url, proc

    def litellm(self, backends: list[str], strategy: str) -> tuple[str, list[Proc]]:
        port = free_port()
        config = self.tmp / f"litellm-{port}.yaml"
        models = "".join(f"""
  - model_name: syn
    litellm_params:
      model: openai/syn
      api_base: {url}/v1
      api_key: none
""" for url in backends)
        config.write_text(f"""model_list:{models}
router_settings:
  routing_strategy: {strategy}
  num_retries: 3
litellm_settings:
  telemetry: false
  drop_params: true
""")
        python = comparison_venv()
        proc = Proc(f"litellm-{strategy}", [str(python), "-m", "litellm.proxy.proxy_cli",
                                            "--config", str(config), "--host", "127.0.0.1",
                                            "--port", str(port), "--num_workers", "1"],
                    # No master key: a proxy on loopback for this run only (LiteLLM asks
                    # for this flag to start without one).
                    {**os.environ, "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
                     "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True",
                     "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"},
                    self.tmp / f"litellm-{port}.log")
        self.cluster.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        def up() -> bool:
            if not proc.alive():
                raise RuntimeError(f"LiteLLM's proxy exited:\n{proc.output()[-3000:]}")
            return _answers(f"{url}/health/liveliness")

        wait_for("LiteLLM's proxy", up, timeout=120)
        return url, [proc]

    def mesh(self, workers: int = BACKENDS, gateways: int = 1
             ) -> tuple[Cluster, list[str], list[Proc], list[Proc]]:
        """A broker, ``gateways`` gateways and ``workers`` synthetic workers: (the
        cluster, the gateways' urls, the router's processes (the broker first), the
        workers)."""
        cluster = Cluster(self.tmp / f"mesh-{len(self.meshes)}",  # product heartbeat
                          env={"MLX_STACK_HEARTBEAT_INTERVAL": "0.5"})
        self.meshes.append(cluster)
        broker = cluster.broker()
        started = [cluster.worker("--engine", "synthetic", "--model", "syn", "--slots",
                                  str(SLOTS), "--rate", str(RATE), "--ttft", str(TTFT))
                   for _ in range(workers)]
        urls = [cluster.gateway() for _ in range(gateways)]
        router = [broker, *(p for p in cluster.procs if p.name.startswith("gateway"))]
        return cluster, urls, router, started

    def close(self) -> None:
        for cluster in [*self.meshes, self.cluster]:
            cluster.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def cpu(procs: list[Proc]) -> float:
    """User + system CPU seconds of ``procs`` and their children so far."""
    total = 0.0
    for proc in procs:
        try:
            ps = psutil.Process(proc.pid)
            for p in [ps, *ps.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            continue
    return total
