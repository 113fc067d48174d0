"""The broker's job table without sockets: each transition's messages, for queueing,
refusals (404, 429, 503), routing ties, pre-token re-dispatch, worker loss, gateways'
liveness and a worker's load."""

from __future__ import annotations

import pytest

from mlx_stack.broker.jobs import MAX_MODELS, MODEL_MEMORY, JobTable, Send
from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.config import Settings
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.plain import from_dict
from mlx_stack.common.status import BrokerStatus, plain

GW = b"gateway"
REQUEST = GenerationRequest(kind="completion", prompt="x", max_tokens=4)


def table(**settings: object) -> JobTable:
    """A table whose peers stay live for a minute unless a test says otherwise."""
    return JobTable(Settings(**{"grace": 5.0, "queue_size": 2, "heartbeat_liveness": 120,
                                **settings}))


def ready(t: JobTable, name: str, slots: int = 1, now: float = 0.0) -> list[Send]:
    return t.worker_message(name.encode(), msgs.Ready(worker_id=name, node_id=name,
                                                      model_id="m", slots=slots), now)


def submit(t: JobTable, job_id: str, model: str = "m", now: float = 0.0,
           attempt: int = 0) -> list[Send]:
    return t.gateway_message(GW, msgs.Submit(job_id=job_id, model=model, request=REQUEST,
                                             attempt=attempt), now)


def jobs_to(sends: list[Send]) -> dict[str, str]:
    """Dispatch id -> worker name, for the JOBs among ``sends``."""
    return {m.job_id: ident.decode() for ident, _, m in sends if isinstance(m, msgs.Job)}


def news(sends: list[Send]) -> list[Send]:
    """``sends`` without the heartbeats (a new gateway's, every tick's)."""
    return [s for s in sends if not isinstance(s[2], msgs.Heartbeat)]


def to_gateway(sends: list[Send]) -> list[msgs.Message]:
    return [m for ident, proto, m in news(sends) if ident == GW and proto == wire.GATEWAY]


def test_a_job_waits_for_a_free_slot_and_runs_when_one_frees() -> None:
    t = table()
    ready(t, "w")
    assert jobs_to(submit(t, "a")) == {"a/0": "w"}
    assert submit(t, "b") == []  # queued: the worker's one slot is taken
    assert list(t.queues["m"]) == ["b"]
    sends = t.worker_message(b"w", msgs.Release(job_id="a/0"), 1.0)
    assert to_gateway(sends) == []  # its FINAL went to the gateway by the job's way
    assert jobs_to(sends) == {"b/0": "w"}
    assert [r.outcome for r in t.routes] == ["ok", "running"]


def test_unknown_model_is_refused_at_once_naming_what_exists() -> None:
    t = table()
    ready(t, "w")
    (fail,) = to_gateway(submit(t, "a", model="nope"))
    assert isinstance(fail, msgs.Fail) and fail.code == msgs.ErrorCode.MODEL_NOT_FOUND
    assert fail.error.endswith("Available: m.")
    assert t.jobs == {}


def test_a_full_queue_is_429_but_a_resubmission_still_gets_in() -> None:
    t = table(queue_size=1)
    ready(t, "w")
    submit(t, "running")
    submit(t, "waiting")
    (fail,) = to_gateway(submit(t, "refused"))
    assert fail.code == msgs.ErrorCode.QUEUE_FULL and fail.retryable
    assert submit(t, "resumed", attempt=1) == []
    assert list(t.queues["m"]) == ["resumed", "waiting"]  # resubmissions wait at the head


def test_a_known_model_without_workers_waits_the_grace_then_503() -> None:
    t = table()
    ready(t, "w")
    t.worker_message(b"w", msgs.Disconnect(), 0.0)
    assert news(submit(t, "a", now=1.0)) == []  # known model: it waits
    assert news(t.tick(5.5)) == []        # within the grace period
    (fail,) = to_gateway(t.tick(6.5))
    assert fail.code == msgs.ErrorCode.NO_WORKER and fail.retryable
    assert t.jobs == {}


def test_a_worker_that_returns_within_the_grace_gets_the_waiting_job() -> None:
    t = table()
    ready(t, "w")
    t.worker_message(b"w", msgs.Disconnect(), 0.0)
    submit(t, "a", now=1.0)
    assert jobs_to(ready(t, "w2", now=3.0)) == {"a/0": "w2"}


def test_equal_workers_take_turns() -> None:
    t = table()
    for name in ("w1", "w2"):
        ready(t, name, slots=4)
    placed = {}
    for i in range(4):
        placed |= jobs_to(submit(t, f"j{i}"))
        t.worker_message(placed[f"j{i}/0"].encode(), msgs.Release(job_id=f"j{i}/0"), 0.0)
    assert list(placed.values()) == ["w1", "w2", "w1", "w2"]


def test_a_worker_lost_before_the_first_token_re_dispatches_silently() -> None:
    t = table()
    ready(t, "w1")
    ready(t, "w2")
    first = jobs_to(submit(t, "a"))["a/0"]
    other = "w2" if first == "w1" else "w1"
    # The worker said the job started (its ACCEPTED, relayed): still nothing reached the
    # client.
    accepted = msgs.Accepted(job_id="a/0", node_id=first, worker_id=first, model_id="m")
    assert to_gateway(t.worker_message(first.encode(), accepted, 0.5)) == [accepted]
    sends = t.worker_message(first.encode(), msgs.Disconnect(), 1.0)
    assert jobs_to(sends) == {"a/1": other}  # a new dispatch id: the old one is stale
    assert to_gateway(sends) == []  # no FAIL: nothing was sent
    assert t.counters["redispatched"] == 1
    stale = t.worker_message(other.encode(), msgs.Partial(job_id="a/0", token_ids=[1], text="x"),
                             1.1)
    assert stale == []


@pytest.mark.parametrize("how", ["disconnect", "silence"])
def test_a_worker_lost_mid_stream_fails_the_job_for_the_gateway_to_resume(how: str) -> None:
    t = table()
    ready(t, "w1", now=0.0)
    ready(t, "w2", now=0.0)
    worker = jobs_to(submit(t, "a"))["a/0"]
    sent = t.worker_message(worker.encode(), msgs.Partial(job_id="a/0", token_ids=[7, 8],
                                                          text="hi"), 0.1)
    assert [m.token_ids for m in to_gateway(sent)] == [[7, 8]]
    if how == "disconnect":
        sends = t.worker_message(worker.encode(), msgs.Disconnect(), 0.2)
    else:
        t.worker_message(b"w2" if worker == "w1" else b"w1", msgs.Heartbeat(), 70.0)
        t.gateway_message(GW, msgs.Heartbeat(), 70.0)
        sends = t.tick(70.0)  # the other one spoke at 70.0; this one is silent since 0.1
    (fail,) = to_gateway(sends)
    assert fail.code == msgs.ErrorCode.WORKER_LOST and fail.retryable
    assert "resume tokens" in fail.error and jobs_to(sends) == {}
    assert t.jobs == {} and t.routes[-1].outcome == "worker_lost"


def test_a_cancelled_running_job_frees_its_slot_when_the_worker_confirms() -> None:
    t = table()
    ready(t, "w")
    submit(t, "a")
    submit(t, "b")
    (cancel,) = [m for _, _, m in t.gateway_message(GW, msgs.Cancel(job_id="a"), 0.5)]
    assert isinstance(cancel, msgs.Cancel) and cancel.job_id == "a/0"
    assert t.workers[b"w"].running == {"a"}  # not before the worker stops
    sends = t.worker_message(b"w", msgs.Fail(job_id="a/0", error="cancelled", retryable=True,
                                             code=msgs.ErrorCode.CANCELLED), 1.0)
    assert to_gateway(sends) == []
    assert jobs_to(sends) == {"b/0": "w"}


def test_an_unregistered_worker_is_told_to_register() -> None:
    t = table()
    sends = t.worker_message(b"ghost", msgs.Final(job_id="x/0", finish_reason="stop"), 0.0)
    assert [(ident, type(m)) for ident, _, m in sends] == [(b"ghost", msgs.Disconnect)]
    assert t.rejected["unregistered"] == 1


def test_a_job_past_its_deadline_is_cancelled_and_504() -> None:
    t = table(request_timeout=2.0)
    ready(t, "w")
    submit(t, "a", now=0.0)
    t.worker_message(b"w", msgs.Heartbeat(), 2.4)  # alive: only the deadline passes
    sends = t.tick(2.5)
    assert [type(m) for _, _, m in news(sends)] == [msgs.Cancel, msgs.Fail]
    assert to_gateway(sends)[0].code == msgs.ErrorCode.DEADLINE


def test_a_model_long_unserved_is_forgotten_and_a_flood_of_names_stays_bounded() -> None:
    t = table()
    ready(t, "w")
    t.worker_message(b"w", msgs.Disconnect(), 1.0)
    t.tick(1.0)
    assert "m" in t.known_models  # a moment ago: a request waits the grace
    t.tick(2.0 + MODEL_MEMORY)
    assert "m" not in t.known_models and "m" not in t.queues
    for n in range(MAX_MODELS + 50):  # resubmissions may name anything
        submit(t, f"j{n}", model=f"made-up-{n}", attempt=1, now=3.0 + n)
    assert len(t.known_models) == MAX_MODELS and "made-up-0" not in t.known_models


def test_a_job_whose_output_went_direct_is_resumed_by_its_gateway_once_heard_of() -> None:
    # The worker streamed straight to the gateway and said so in its heartbeat: a loss
    # now means a resume from what the client saw, not a run from the start.
    t = table()
    ready(t, "w1")
    ready(t, "w2")
    worker = jobs_to(submit(t, "a"))["a/0"]
    assert t.worker_message(worker.encode(), msgs.Heartbeat(streamed=["a/0", "x/0"]), 0.1) == []
    (fail,) = to_gateway(t.worker_message(worker.encode(), msgs.Disconnect(), 0.2))
    assert fail.code == msgs.ErrorCode.WORKER_LOST and fail.retryable


@pytest.mark.parametrize(("reply_to", "worker_node", "given"), [
    ("tcp://10.0.0.2:5000", "elsewhere", "tcp://10.0.0.2:5000"),
    ("tcp://127.0.0.1:5000", "gw-node", "tcp://127.0.0.1:5000"),
    ("tcp://127.0.0.1:5000", "elsewhere", ""),  # would name the worker's own machine
    ("", "gw-node", ""),
])
def test_a_job_names_the_gateways_stream_endpoint_only_where_it_is_reachable(
        reply_to: str, worker_node: str, given: str) -> None:
    t = table()
    t.worker_message(b"w", msgs.Ready(worker_id="w", node_id=worker_node, model_id="m"), 0.0)
    sends = t.gateway_message(GW, msgs.Submit(job_id="a", model="m", request=REQUEST,
                                              node_id="gw-node", reply_to=reply_to), 0.0)
    (job,) = [m for _, _, m in sends if isinstance(m, msgs.Job)]
    assert job.reply_to == given


# ------------------------------------------------------------- one name, one model


def serve(t: JobTable, name: str, model: str, tiers: list[str], slots: int = 1,
          context_length: int = 0, now: float = 0.0) -> list[Send]:
    """Worker ``name`` (on node ``name``) registers ``model`` under ``tiers``."""
    return t.worker_message(name.encode(), msgs.Ready(
        worker_id=name, node_id=name, model_id=model, tiers=tiers, slots=slots,
        context_length=context_length), now)


def test_a_name_two_models_serve_goes_only_to_the_one_most_workers_serve_it_with() -> None:
    t = table(queue_size=8)
    serve(t, "mini-1", "mini", ["standard"])
    serve(t, "qwen-1", "qwen", ["standard", "premium"])
    serve(t, "qwen-2", "qwen", ["standard"])
    placed: dict[str, str] = {}
    for i in range(3):
        placed |= jobs_to(submit(t, f"j{i}", model="standard"))
    # Two free slots of qwen: two jobs; the third waits although mini's slot is free
    # (mini sorts first: the majority, not the name's order, decides).
    assert sorted(placed.values()) == ["qwen-1", "qwen-2"]
    assert list(t.queues["standard"]) == ["j2"]
    assert jobs_to(submit(t, "s", model="mini")) == {"s/0": "mini-1"}  # its own id still
    entry = {e.id: e for e in t.models()}["standard"]
    assert (entry.model_id, entry.workers, entry.nodes) == ("qwen", 2, ["qwen-1", "qwen-2"])
    assert entry.ambiguous == ["mini", "qwen"] and entry.queued == 1
    assert not {e.id: e for e in t.models()}["premium"].ambiguous


def test_a_tie_goes_to_the_model_whose_id_sorts_first_and_a_model_id_to_that_model() -> None:
    for order in (["beta", "alpha"], ["alpha", "beta"]):  # whoever registered first
        t = table()
        for model in order:
            serve(t, f"{model}-1", model, ["standard"])
        assert jobs_to(submit(t, "a", model="standard")) == {"a/0": "alpha-1"}
    # A model's own id names that model, however many workers give it as a tier.
    t = table()
    serve(t, "fast-1", "fast", [])
    serve(t, "other-1", "other", ["fast"])
    serve(t, "other-2", "other", ["fast"])
    assert jobs_to(submit(t, "a", model="fast")) == {"a/0": "fast-1"}
    assert {e.id: e for e in t.models()}["fast"].ambiguous == ["fast", "other"]


def test_an_ambiguous_name_is_warned_of_once_with_the_fix(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    t = table()
    serve(t, "b-1", "b", ["standard"])
    serve(t, "b-2", "b", ["standard"])
    caplog.set_level("WARNING", logger="broker")
    serve(t, "a-1", "a", ["standard"])
    serve(t, "a-2", "a", ["standard", "premium"])  # still ambiguous: no second warning
    t.tick(0.1)
    warned = [r.getMessage() for r in caplog.records if "name_ambiguous" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "name=standard models=a,b routed_to=b" in warned[0]
    assert "give one of them another tier" in warned[0]
    # No longer ambiguous, then ambiguous again: said again.
    for worker in (b"a-1", b"a-2"):
        t.worker_message(worker, msgs.Disconnect(), 0.2)
    t.tick(0.3)
    serve(t, "a-3", "a", ["standard"], now=0.4)
    assert sum("name_ambiguous" in r.getMessage() for r in caplog.records) == 2


def test_models_list_each_tier_with_its_model_and_the_context_length() -> None:
    t = table()
    serve(t, "w1", "qwen-32b", ["standard", "premium"], context_length=32768)
    serve(t, "w2", "qwen-32b", ["standard"], context_length=32768)
    serve(t, "w3", "llama-8b", ["fast"], context_length=8192)
    models = {e.id: e for e in t.models()}
    assert sorted(models) == ["fast", "llama-8b", "premium", "qwen-32b", "standard"]
    assert models["qwen-32b"].tiers == ["premium", "standard"]
    assert not models["qwen-32b"].is_tier and models["premium"].is_tier
    assert (models["standard"].model_id, models["standard"].workers) == ("qwen-32b", 2)
    assert (models["premium"].model_id, models["premium"].nodes) == ("qwen-32b", ["w1"])
    assert models["fast"].context_length == 8192
    assert models["standard"].context_length == 32768
    assert not any(e.ambiguous for e in models.values())


def test_a_silent_gateway_is_purged_its_jobs_cancelled_and_it_is_told_to_resubmit() -> None:
    t = table(heartbeat_interval=1.0, heartbeat_liveness=3)  # a peer timeout of 3 s
    ready(t, "w")
    first = submit(t, "a", now=0.0)
    assert [type(m) for m in (m for i, _, m in first if i == GW)][:1] == [msgs.Heartbeat]
    submit(t, "b", now=0.0)  # queued behind a
    t.worker_message(b"w", msgs.Heartbeat(), 2.9)
    assert to_gateway(t.tick(2.9)) == [] and GW in t.gateways  # within the timeout
    t.worker_message(b"w", msgs.Heartbeat(), 3.1)
    sends = news(t.tick(3.1))  # time comes from ``now`` only: silent since 0.0
    assert [(i, type(m)) for i, _, m in sends] == [(b"w", msgs.Cancel),
                                                  (GW, msgs.Disconnect)]
    assert sends[1][2].reason == msgs.Reason.JOBS_DROPPED
    assert GW not in t.gateways and list(t.jobs) == ["a"]  # b is gone, a until w confirms
    again = t.gateway_message(GW, msgs.Heartbeat(), 4.0)  # it speaks before it noticed
    assert [type(m) for _, _, m in again] == [msgs.Heartbeat, msgs.Disconnect]
    assert [type(m) for _, _, m in t.gateway_message(GW, msgs.Heartbeat(), 4.5)] == []


def test_a_gateway_that_leaves_has_its_jobs_cancelled_and_a_one_off_question_registers_nobody(
        ) -> None:
    t = table()
    ready(t, "w")
    submit(t, "a")
    sends = t.gateway_message(GW, msgs.Disconnect(), 1.0)
    assert [type(m) for _, _, m in sends] == [msgs.Cancel]  # nothing to tell who left
    assert GW not in t.gateways and t.gateway_message(GW, msgs.Heartbeat(), 1.5)[0][2] == \
        msgs.Heartbeat(session=t.session)  # new again, and nothing dropped to resubmit
    assert t.gateway_message(b"cli", msgs.Control(request_id="r", op="status"), 2.0) == []
    assert b"cli" not in t.gateways


def test_a_route_is_timed_by_now_alone() -> None:
    t = JobTable(Settings(), wall_offset=1_000_000.0)
    ready(t, "w")
    submit(t, "a", now=10.0)
    submit(t, "b", now=10.5)
    t.worker_message(b"w", msgs.Release(job_id="a/0"), 12.0)
    a, b = t.routes
    assert (a.time, a.queue_wait_ms) == (1_000_010.0, 0.0)
    assert (b.time, b.queue_wait_ms) == (1_000_012.0, 1500.0)


def test_a_workers_load_is_kept_as_it_came_and_shown_in_its_status() -> None:
    t = table()
    t.worker_message(b"w", msgs.Ready(worker_id="w", node_id="n", model_id="m", slots=2,
                                      load=msgs.WorkerLoad(mem_free=7)), 0.0)
    assert t.workers[b"w"].status(0.0).load == msgs.WorkerLoad(mem_free=7)
    load = msgs.WorkerLoad(running=1, mem_free=5, tokens_per_s=2.5, kv_bytes=9,
                           counters={"jobs_done": 3})
    t.worker_message(b"w", msgs.Heartbeat(load=load), 1.0)
    status = t.workers[b"w"].status(1.5)
    assert status.load == load and status.last_heartbeat_s == 0.5
    decoded = from_dict(BrokerStatus, plain(BrokerStatus(
        node_id="n", endpoint="e", role="coordinator", coordinator="e", epoch=1,
        workers=[status])))
    assert decoded.workers[0].load == load  # through CONTROL: a nested record, typed
