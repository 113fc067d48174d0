"""Workers that hang without dying, and engines that fail under a batch (real processes,
synthetic engines with their fault switches): every stream ends with its exact text,
soon, and nothing stale from the worker that stopped reaches a client or a count."""

from __future__ import annotations

import signal
import time

from mlx_stack.worker.server import EXIT_STALLED
from mlx_stack.worker.synthetic import STEP_ERROR, STEP_HANG
from testkit.harness import Cluster, wait_for
from testkit.scenarios import expected_text, synthetic_workers
from testkit.sse import BackgroundStream

LIVENESS = 0.6
"""The cluster fixture's heartbeats: 200 ms x 3."""


def test_a_worker_stopped_10s_mid_stream_resumes_elsewhere_and_its_late_output_is_dropped(
        cluster: Cluster) -> None:
    workers = synthetic_workers(cluster, "node-a", "node-b", rate=20)
    url = cluster.gateway()
    stream = BackgroundStream(url, "paused", 300).start()  # 15 s: still live when the worker thaws
    wait_for("some tokens", lambda: len(stream.text.split()) >= 10)
    frozen = workers[stream.headers["x-mlx-stack-node"]]
    frozen.kill(signal.SIGSTOP)
    try:
        wait_for("the frozen worker to be purged", lambda: len(cluster.workers()) == 1)
        wait_for("the stream to go on elsewhere", lambda: len(stream.arrivals) >= 2
                 and stream.arrivals[-1] > time.perf_counter() - 0.5)
        time.sleep(max(0.0, 10 - (time.perf_counter() - stream.arrivals[-1])))  # the fault: 10 s
        assert not stream.closed, "the stream ended before the worker thawed"
    finally:
        frozen.kill(signal.SIGCONT)
    # Thawed, it still runs the old dispatch, and sends on until the broker tells it so.
    wait_for("the thawed worker to register again", lambda: len(cluster.workers()) == 2)
    stream.wait()
    assert stream.text == expected_text("paused", 300)
    assert stream.chunks[-1]["usage"]["completion_tokens"] == 300
    assert stream.longest_gap < LIVENESS + 1.0, stream.longest_gap
    # The broker did not count the thawed worker's late output: the moved attempt stays
    # lost, the attempt that finished is the only one ok.
    outcomes = sorted(r.outcome for r in cluster.control("routes", last=10))
    assert outcomes == ["ok", "worker_lost"], outcomes


def test_an_engine_step_that_never_returns_is_noticed_and_its_jobs_resume(
        cluster: Cluster) -> None:
    stall = 1.0
    workers = {n: cluster.worker("--engine", "synthetic", "--model", "syn", "--rate", "20",
                                 node=n, env={"MLX_STACK_ENGINE_STALL_TIMEOUT": str(stall)})
               for n in ("node-a", "node-b")}
    url = cluster.gateway()
    prompt = f"wedge {STEP_HANG}"
    stream = BackgroundStream(url, prompt, 40).start()
    assert stream.first.wait(30), stream.error
    hung = workers[stream.headers["x-mlx-stack-node"]]
    stream.wait()
    assert stream.text == expected_text(prompt, 40)
    # Noticed within the stall timeout (plus a heartbeat interval), resumed at once.
    assert stream.longest_gap < stall + LIVENESS + 1.0, stream.longest_gap
    wait_for("the hung worker to exit", lambda: not hung.alive(), timeout=10)
    assert hung.popen.returncode == EXIT_STALLED
    assert "engine_stalled" in hung.output() and "/0" in hung.output(), hung.output()


def test_an_engine_step_error_mid_batch_resumes_every_job_of_the_batch(
        cluster: Cluster) -> None:
    workers = {n: cluster.worker("--engine", "synthetic", "--model", "syn", "--rate", "20",
                                 "--slots", "4", node=n) for n in ("node-a", "node-b")}
    url = cluster.gateway()
    prompts = [f"batch {i}" + (f" {STEP_ERROR}" if i == 0 else "") for i in range(4)]
    streams = [BackgroundStream(url, content, 40).start() for content in prompts]
    for s in streams:
        s.wait()
    for content, s in zip(prompts, streams, strict=True):
        assert s.text == expected_text(content, 40), content
    node = streams[0].headers["x-mlx-stack-node"]
    failed = workers[node]
    log = failed.output()
    assert log.count("engine_step_failed") == 1, log
    line = next(x for x in log.splitlines() if "engine_step_failed" in x)
    # Every job of the lost batch is named, and each was lost and resumed elsewhere.
    lost = {r.job_id for r in cluster.control("routes", last=20) if r.outcome == "worker_lost"}
    assert lost and all(job in line for job in lost), (lost, line)
    assert failed.alive() and len(cluster.workers()) == 2  # it stays up and serves on
    (worker_id,) = [w.worker_id for w in cluster.workers() if w.node_id == node]
    counters = cluster.counters_when(lambda w: w.load.counters.get("engine_errors"), worker_id)
    assert counters["engine_errors"] == 1
