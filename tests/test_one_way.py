"""One way out for each job (issue 26): every frame of a dispatch takes the way chosen when
it started, and the seat is freed by the worker's RELEASE, not by a FINAL the broker
would have to see. The broker's side without sockets; the whole path with real
processes: the first job to a new gateway already goes straight to it."""

from __future__ import annotations

from mlx_stack.broker.jobs import JobTable
from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.config import Settings
from mlx_stack.common.generation import GenerationRequest
from testkit.harness import Cluster, wait_for
from testkit.scenarios import expected_text, synthetic_workers
from testkit.sse import BackgroundStream

GW = b"gateway"


def test_the_broker_relays_a_relayed_jobs_frames_and_only_its_release_frees_the_seat(
        ) -> None:
    t = JobTable(Settings(grace=5.0))
    t.worker_message(b"w", msgs.Ready(worker_id="w", node_id="n", model_id="m", slots=1), 0.0)
    request = GenerationRequest(kind="completion", prompt="x", max_tokens=4)
    for job_id in ("a", "b"):
        t.gateway_message(GW, msgs.Submit(job_id=job_id, model="m", request=request), 0.0)
    frames = [msgs.Accepted(job_id="a/0", node_id="n", worker_id="w", model_id="m"),
              msgs.Partial(job_id="a/0", token_ids=[1], text="x"),
              msgs.Final(job_id="a/0", finish_reason="stop", parts=1)]
    for frame in frames:  # passed on as they came, and the FINAL ends nothing here
        assert t.worker_message(b"w", frame, 0.1) == [(GW, wire.GATEWAY, frame)]
    assert t.workers[b"w"].running == {"a"} and list(t.queues["m"]) == ["b"]
    sends = t.worker_message(b"w", msgs.Release(job_id="a/0"), 0.2)
    assert [(ident, type(m)) for ident, _, m in sends] == [(b"w", msgs.Job)]  # b takes the seat
    assert t.routes[0].outcome == "ok" and "a" not in t.jobs


def test_the_first_job_to_a_new_gateway_goes_straight_to_it(cluster: Cluster) -> None:
    synthetic_workers(cluster, "node-a")
    url = cluster.gateway(node="node-a")
    stream = BackgroundStream(url, "first of all", 8).start()
    stream.wait()
    assert stream.text == expected_text("first of all", 8)
    (worker,) = wait_for("the worker's heartbeat after the job", lambda: [
        w for w in cluster.workers() if w.load.counters.get("jobs_done") == 1] or None)
    assert worker.load.counters.get("jobs_direct") == 1, worker.load.counters
    assert worker.load.counters.get("jobs_relayed", 0) == 0, worker.load.counters
    # The broker saw none of its frames: the worker's RELEASE ended the job there.
    assert [r.outcome for r in cluster.control("routes", last=1)] == ["ok"]

def test_a_released_job_lost_with_its_connection_or_worker_is_resumed_by_its_gateway(
        ) -> None:
    """A direct job's FINAL may be lost with the connection it took (or with its worker,
    killed before its last frames left) after the RELEASE reached the broker: for
    RELEASED_WATCH_S (output may wait that long queued behind a slow link) the broker
    still tells the gateway, which resumes it unless the FINAL came."""
    t = JobTable(Settings(grace=5.0, heartbeat_interval=0.5, heartbeat_liveness=3))
    t.worker_message(b"w", msgs.Ready(worker_id="w", node_id="n", model_id="m", slots=2), 0.0)
    request = GenerationRequest(kind="completion", prompt="x", max_tokens=4)
    for job_id in ("a", "b", "c"):
        t.gateway_message(GW, msgs.Submit(job_id=job_id, model="m", request=request), 0.0)
        t.worker_message(b"w", msgs.Release(job_id=f"{job_id}/0"), 0.1)
    # a: the worker saw its connection to the gateway drop.
    stream_lost = msgs.Fail(job_id="a/0", error="the stream to the gateway was lost",
                            code=msgs.ErrorCode.CANCELLED, retryable=True)
    (told,) = [m for ident, _, m in t.worker_message(b"w", stream_lost, 0.5) if ident == GW]
    assert (told.job_id, told.code, told.retryable) == ("a/0", msgs.ErrorCode.WORKER_LOST, True)
    # b, c: the worker, last heard at 0.5 s, is purged a peer timeout (1.5 s) later.
    sends = t.tick(2.1)
    assert [(m.job_id, m.code) for ident, _, m in sends if ident == GW and
            isinstance(m, msgs.Fail)] == [("b/0", msgs.ErrorCode.WORKER_LOST),
                                          ("c/0", msgs.ErrorCode.WORKER_LOST)]
    # Within RELEASED_WATCH_S of the RELEASE a FAIL is still told; after, it is stale.
    t.worker_message(b"w", msgs.Ready(worker_id="w", node_id="n", model_id="m", slots=2), 3.0)
    for job_id in ("d", "e"):
        t.gateway_message(GW, msgs.Submit(job_id=job_id, model="m", request=request), 3.0)
        t.worker_message(b"w", msgs.Release(job_id=f"{job_id}/0"), 3.1)

    def alive_until(end: float, now: float) -> float:
        """Heartbeats of the worker and the gateway every 0.5 s until ``end``."""
        while now < end:
            now = min(now + 0.5, end)
            t.worker_message(b"w", msgs.Heartbeat(), now)
            t.gateway_message(GW, msgs.Heartbeat(), now)
            t.tick(now)
        return now

    def told(job_id: str, now: float) -> list[str]:
        fail = msgs.Fail(job_id=job_id, error="lost", code=msgs.ErrorCode.CANCELLED,
                         retryable=True)
        return [m.job_id for ident, _, m in t.worker_message(b"w", fail, now) if ident == GW]

    ends = 3.1 + msgs.RELEASED_WATCH_S
    assert told("e/0", alive_until(ends - 0.5, 3.1)) == ["e/0"]
    assert told("d/0", alive_until(ends + 0.1, ends - 0.5)) == []
