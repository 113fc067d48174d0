"""The two servers ``bench.batching`` compares, as processes: started in a session of their
own, ready once they complete a request, stopped with everything they started (on exit,
error, Ctrl-C or SIGTERM alike), and the BLAS library each really mapped.

Why a module of its own: what runs the systems under test is not what measures them;
``bench.batching`` (the phases, the summaries, the report and the command) uses these.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench.one_node import wait_healthy

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 300.0
STOP_GRACE = 20.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Server:
    """One system under test: where to reach it, the model name it answers to."""

    name: str
    url: str
    model: str
    proc: subprocess.Popen[bytes]
    log: Path


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, wait, then SIGKILL; then every descendant still alive
    (``mlx-stack up`` starts each role in a session of its own)."""
    # A second Ctrl-C or SIGTERM must not cut this short.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        family = descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for child in family:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _, alive = psutil.wait_procs(family, timeout=5)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(alive, timeout=5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], log_path: Path) -> Iterator[
        subprocess.Popen[bytes]]:
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_ready(server: Server, timeout: float = READY_TIMEOUT) -> None:
    """GET /health answers 200 and a tiny completion succeeds (a model may still be
    loading after /health)."""
    deadline = time.monotonic() + timeout
    try:
        wait_healthy(server.url, server.proc, timeout)
    except SystemExit as exc:
        raise RuntimeError(f"{server.name} not healthy ({exc}); its log:\n"
                           f"{tail(server.log)}") from None
    body = {"model": server.model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi."}]}
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
            response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
            if response.status_code == 200 and response.json()["choices"][0]["message"]:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} never completed a request; its log:\n"
                       f"{tail(server.log)}")


def mapped_blas(pid: int) -> list[str] | None:
    """The BLAS libraries a process has mapped (None where that cannot be read)."""
    try:
        paths = {m.path for m in psutil.Process(pid).memory_maps()}
    except (psutil.Error, NotImplementedError, OSError):
        return None
    return sorted(p for p in paths if "blas" in Path(p).name.lower())


def worker_pid(up: subprocess.Popen[bytes]) -> int | None:
    for child in descendants(up.pid):
        with contextlib.suppress(psutil.Error):
            if "worker" in child.cmdline()[3:4]:  # python -m mlx_stack.cli worker ...
                return child.pid
    return None


def resolve_library(name: str | None) -> str | None:
    """The file behind a library name this process loaded (find_library gives a soname)."""
    if name is None or "/" in name:
        return name
    stem = name.split(".so")[0]
    for path in mapped_blas(os.getpid()) or []:
        if Path(path).name.startswith(stem):
            return path
    return name
