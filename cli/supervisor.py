"""``mlx-stack up``: this node's roles as child processes, restarted when they die.

Each role runs as ``python -m mlx_stack.cli <role>`` in its own session (so a terminal's Ctrl-C
reaches only the supervisor, which then stops the children in order: gateway, workers,
broker). On Linux a child also gets SIGTERM if the supervisor itself dies, so nothing is
left behind. A child that dies is restarted with exponential backoff (reset after a
minute of good health).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from rich.console import Console

MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
HEALTHY_AFTER = 60.0
STOP_TIMEOUT = 5.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """One supervised role process."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = MIN_BACKOFF
    restart_at: float = 0.0
    restarts: int = field(default=0)

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(self.argv, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self.started = time.monotonic()


class Supervisor:
    """Starts ``children``, keeps them alive, stops them all on SIGINT/SIGTERM."""

    def __init__(self, children: list[Child], env: dict[str, str], console: Console) -> None:
        self.children = children
        self.env = env
        self.console = console
        self.stopping = threading.Event()

    def run(self, health_url: str, models: list[str], banner: str) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        for child in self.children:
            child.start(self.env)
        threading.Thread(target=self._announce, args=(health_url, models, banner),
                         daemon=True).start()
        while not self.stopping.wait(0.2):
            self._reap(time.monotonic())
        self._stop_all()
        return 0

    def _reap(self, now: float) -> None:
        for child in self.children:
            if child.proc is None:
                if now >= child.restart_at:
                    child.start(self.env)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            if now - child.started > HEALTHY_AFTER:
                child.backoff = MIN_BACKOFF
            child.proc = None
            child.restarts += 1
            child.restart_at = now + child.backoff
            self.console.print(f"[yellow]{child.name} exited with code {code}; restarting in "
                               f"{child.backoff:.1f} s[/yellow]")
            child.backoff = min(child.backoff * 2, MAX_BACKOFF)

    def _stop_all(self) -> None:
        self.console.print("stopping ...")
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()

    def _announce(self, health_url: str, models: list[str], banner: str) -> None:
        """Print the banner once the gateway's /health lists every one of ``models``: the
        node serves them all, not merely one."""
        while not self.stopping.is_set():
            try:
                with urllib.request.urlopen(health_url, timeout=2) as response:
                    if set(models) <= set(json.load(response).get("models", [])):
                        self.console.print(banner)
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass  # not up yet (503 is an HTTPError, a URLError)
            self.stopping.wait(0.5)


def role_argv(role: str, *args: str) -> list[str]:
    """The command line that runs one role of this installation."""
    return [sys.executable, "-m", "mlx_stack.cli", role, *args]


def child_env(overrides: dict[str, object]) -> dict[str, str]:
    """The environment for children: ours plus the supervisor's settings as MLX_STACK_*."""
    env = dict(os.environ)
    env.update({f"MLX_STACK_{k.upper()}": str(v) for k, v in overrides.items() if v is not None})
    return env
