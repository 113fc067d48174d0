"""One way out for each job (issue 26): every frame of a dispatch takes the way chosen when
it started, and the seat is freed by the worker's RELEASE, not by a FINAL the broker
would have to see. The broker's side without sockets; the whole path with real
processes: the first job to a new gateway already goes straight to it."""

from __future__ import annotations

from broker.jobs import JobTable
from common import messages as msgs
from common import wire
from common.config import Settings
from common.generation import GenerationRequest
from tests.harness import Cluster, wait_for
from tests.test_failover import Stream, expected_text, nodes

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
    nodes(cluster, "node-a")
    url = cluster.gateway(node="node-a")
    stream = Stream(url, "first of all", 8).start()
    stream.wait()
    assert stream.text == expected_text("first of all", 8)
    (worker,) = wait_for("the worker's heartbeat after the job", lambda: [
        w for w in cluster.workers() if w.load.counters.get("jobs_done") == 1] or None)
    assert worker.load.counters.get("jobs_direct") == 1, worker.load.counters
    assert worker.load.counters.get("jobs_relayed", 0) == 0, worker.load.counters
    # The broker saw none of its frames: the worker's RELEASE ended the job there.
    assert [r.outcome for r in cluster.control("routes", last=1)] == ["ok"]
