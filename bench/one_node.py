"""What the mesh path costs on one node: the real model through gateway + broker + worker
vs the same engine called in-process, at concurrency 1. Prints JSON.

    .venv/bin/python -m bench.one_node [--runs 7] [--max-tokens 64]

Both sides run the same greedy request and are timed the same way: time to first token
(request sent -> first text received) and generation tokens/s (tokens after the first /
time from first text to the end). Runs alternate between the two paths so that drift of
the machine hits both alike, and which path goes first alternates from pair to pair;
medians are reported with the mesh/direct ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import psutil

from mlx_stack.common import messages as msgs
from mlx_stack.common.config import Settings
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.worker.batch import BatchLoop
from mlx_stack.worker.blas import preload_openblas
from mlx_stack.worker.default_model import DEFAULT_MODEL_ID, ensure_default_model
from testkit.harness import free_port, healthy, wait_for
from testkit.sse import content_of, read_chat_sync

MESSAGES = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


def timed_direct(loop: BatchLoop, outbox: queue.SimpleQueue, max_tokens: int
                 ) -> tuple[float, float, int]:
    """One request through the worker's batch loop in this process (no sockets)."""
    request = GenerationRequest(kind="chat", messages=MESSAGES, max_tokens=max_tokens,
                                  temperature=0.0)
    stamps: list[float] = []
    start = time.perf_counter()
    loop.put(msgs.Job(job_id=f"bench-{start}", request=request))
    while not isinstance(msg := outbox.get(timeout=300), msgs.Final):
        if isinstance(msg, msgs.Partial) and msg.text:
            stamps.append(time.perf_counter())
    stamps.append(time.perf_counter())
    tokens = msg.usage["completion_tokens"]
    return stamps[0] - start, (tokens - 1) / (stamps[-1] - stamps[0]), tokens


def timed_mesh(client: httpx.Client, url: str, max_tokens: int) -> tuple[float, float, int]:
    """The same request through the mesh at ``url``, timed from the chunks that carry
    text or the finish."""
    body = {"model": "standard", "messages": MESSAGES, "max_tokens": max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    stream = read_chat_sync(client, url, body).check()
    stamps = [t for chunk, t in zip(stream.chunks, stream.arrivals, strict=True)
              if content_of(chunk) or any(c.get("finish_reason") for c in chunk["choices"])]
    tokens = stream.usage["completion_tokens"]
    return stamps[0] - stream.sent, (tokens - 1) / (stamps[-1] - stamps[0]), tokens


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until the mesh ``proc`` runs serves at ``url``; SystemExit if it exits or does not
    within ``timeout``."""
    def ready() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"mlx-stack up exited with {proc.returncode}")
        return healthy(url)

    try:
        wait_for("the mesh to be healthy", ready, timeout, every=0.2)
    except AssertionError:
        raise SystemExit("the mesh did not become healthy") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    blas = preload_openblas()
    models_dir = Settings.load().models_path
    model_path = ensure_default_model(models_dir)
    port = free_port()
    home = tempfile.mkdtemp(prefix="mlxs-bench-")
    env = {**os.environ, "MLX_STACK_HOME": home, "MLX_STACK_MODELS_DIR": str(models_dir)}
    up = subprocess.Popen([sys.executable, "-m", "mlx_stack.cli", "up", "--port", str(port),
                           "--broker-port", str(free_port())], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, up)
        from mlx_stack.worker.mlx_engine import MlxEngine

        # The node's worker settings (prompt cache included: every run repeats the prompt).
        defaults = Settings()
        engine = MlxEngine(model_path, DEFAULT_MODEL_ID, max_slots=defaults.max_slots,
                           prompt_cache_bytes=defaults.prompt_cache_bytes,
                           free_memory=psutil.virtual_memory().available)
        outbox: queue.SimpleQueue[msgs.Message] = queue.SimpleQueue()
        loop = BatchLoop(engine, outbox.put, lambda _: None)
        threading.Thread(target=loop.run, daemon=True).start()
        client = httpx.Client(timeout=300)
        timed_direct(loop, outbox, 8)  # warm both paths
        timed_mesh(client, url, 8)
        direct, mesh = [], []
        for run in range(args.runs):  # who goes first alternates: no ordering bias
            if run % 2:
                direct.append(timed_direct(loop, outbox, args.max_tokens))
            mesh.append(timed_mesh(client, url, args.max_tokens))
            if not run % 2:
                direct.append(timed_direct(loop, outbox, args.max_tokens))
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(20)

    def summary(runs: list[tuple[float, float, int]]) -> dict[str, float]:
        return {"ttft_ms_p50": round(statistics.median(r[0] for r in runs) * 1000, 1),
                "gen_tokens_per_s_p50": round(statistics.median(r[1] for r in runs), 2),
                "completion_tokens": runs[0][2]}

    d, m = summary(direct), summary(mesh)
    # Runs alternate, so run i of each path saw the same machine: the paired difference
    # is the mesh's own cost with most of the machine's drift taken out.
    ttft_deltas = [(a[0] - b[0]) * 1000 for a, b in zip(mesh, direct, strict=True)]
    print(json.dumps({
        "benchmark": "one_node",
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "model": DEFAULT_MODEL_ID,
        "runs": args.runs,
        "max_tokens": args.max_tokens,
        "concurrency": 1,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "blas": blas},
        "direct": d,
        "mesh": m,
        "paired_ttft_delta_ms_p50": round(statistics.median(ttft_deltas), 1),
        "mesh_over_direct": {
            "ttft": round(m["ttft_ms_p50"] / d["ttft_ms_p50"], 4),
            "gen_tokens_per_s": round(m["gen_tokens_per_s_p50"] / d["gen_tokens_per_s_p50"], 4),
        },
    }, indent=2))


if __name__ == "__main__":
    main()
