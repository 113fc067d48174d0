"""``GET /metrics`` of a gateway (real processes, synthetic workers): counters move as
requests are served, a worker killed mid-stream shows as a mid-stream failover and one
worker fewer, and without a broker the gateway's own figures are still served."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.harness import Cluster, wait_for
from testkit.scenarios import expected_text, synthetic_workers
from testkit.sse import BackgroundStream

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of ``/metrics``, keyed by (name, labels)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it is not exposed (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= ls)


def test_counters_follow_requests_and_a_killed_worker(cluster: Cluster) -> None:
    workers = synthetic_workers(cluster, "node-a", "node-b")
    url = cluster.gateway()
    # The broker's figures are asked at scrape time (1 s timeout): wait for an answer.
    before = wait_for("a scrape with the broker's figures", lambda: s if value(
        s := scrape(url), "mlx_stack_broker_up") == 1 else None, timeout=10)
    assert value(before, "mlx_stack_broker_epoch") >= 1
    assert value(before, "mlx_stack_broker_role", node="node-a", role="coordinator") == 1
    assert value(before, "mlx_stack_workers", model="syn", state="idle") == 2
    assert value(before, "mlx_stack_queue_depth", model="syn") == 0
    assert value(before, "mlx_stack_requests_total", model="syn", status="200") == 0

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model="syn", max_tokens=7, messages=[{"role": "user", "content": "one"}])
    streamed = client.chat.completions.create(
        model="syn", max_tokens=5, stream=True, messages=[{"role": "user", "content": "two"}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[
            {"role": "user", "content": "three"}])
    # A stream is counted when its response is over, just after the client read [DONE].
    served = wait_for("both answers counted", lambda: s if value(
        s := scrape(url), "mlx_stack_requests_total", model="syn", status="200") == 2 else None)
    assert value(served, "mlx_stack_requests_total", model="unknown", status="404") == 1
    assert value(served, "mlx_stack_tokens_generated_total", model="syn") == (
        reply.usage.completion_tokens + 5)
    assert value(served, "mlx_stack_time_to_first_token_seconds_count", model="syn") == 2
    assert value(served, "mlx_stack_request_duration_seconds_count", model="syn") == 2
    assert value(served, "mlx_stack_request_duration_seconds_count", model="unknown") == 1

    stream = BackgroundStream(url, "tell me a story", 60).start()
    wait_for("some tokens", lambda: len(stream.text.split()) >= 10)
    wait_for("one busy worker", lambda: value(
        scrape(url), "mlx_stack_workers", model="syn", state="busy") == 1, timeout=10)
    workers[stream.headers["x-mlx-stack-node"]].kill(signal.SIGKILL)
    stream.wait()
    assert stream.text == expected_text("tell me a story", 60)
    after = wait_for("one worker left in /metrics", lambda: (
        s if total(s := scrape(url), "mlx_stack_workers", model="syn") == 1 else None))
    # At least: on a loaded machine a stalled heartbeat may add a coordinator failover.
    assert value(after, "mlx_stack_failovers_total", kind="mid_stream") >= 1
    kinds = {dict(ls)["kind"] for n, ls in after if n == "mlx_stack_failovers_total"}
    assert kinds == {"pre_token", "mid_stream", "coordinator", "lost_frame"}
    assert value(after, "mlx_stack_tokens_generated_total", model="syn") == (
        reply.usage.completion_tokens + 5 + 60)


def test_without_a_broker_local_metrics_are_served_and_up_is_0(cluster: Cluster) -> None:
    synthetic_workers(cluster, "node-a")
    url = cluster.gateway()
    reply = httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": "syn", "prompt": "hi", "max_tokens": 3})
    assert reply.status_code == 200
    cluster.procs[0].kill(signal.SIGKILL)  # the broker
    cluster.procs[0].popen.wait(10)
    down = scrape(url)
    assert value(down, "mlx_stack_broker_up") == 0
    assert value(down, "mlx_stack_requests_total", model="syn", status="200") == 1
    assert ("mlx_stack_broker_epoch", frozenset()) not in down

    cluster.broker()  # a new broker: the gateway finds it and counts the change
    back = wait_for("the broker to be up again in /metrics", lambda: (
        s if value(s := scrape(url), "mlx_stack_broker_up") == 1 else None))
    assert value(back, "mlx_stack_broker_changes_total") >= 1


def test_pre_token_failovers_are_counted_by_the_gateway_and_survive_a_new_coordinator(
        cluster: Cluster) -> None:
    slow = cluster.worker("--engine", "synthetic", "--model", "syn", "--ttft", "30")
    url = cluster.gateway()
    stream = BackgroundStream(url, "patience", 10).start()
    # The headers came: the slow worker's "started" PARTIAL reached the gateway.
    assert stream.first.wait(10) and stream.headers, stream.error
    synthetic_workers(cluster, "node-b")
    slow.kill(signal.SIGKILL)  # before its first token: the coordinator re-dispatches
    stream.wait()
    assert stream.text == expected_text("patience", 10)
    after = scrape(url)
    assert value(after, "mlx_stack_failovers_total", kind="pre_token") == 1
    # The new worker's PARTIALs count from 0 again; the gateway resubmitted nothing.
    assert value(after, "mlx_stack_failovers_total", kind="lost_frame") == 0
    assert value(after, "mlx_stack_failovers_total", kind="mid_stream") == 0
    cluster.procs[0].kill(signal.SIGKILL)  # the broker: a new coordinator, counters at 0
    cluster.broker()
    assert value(scrape(url), "mlx_stack_failovers_total", kind="pre_token") == 1


def test_fastapis_opentelemetry_is_off_unless_the_environment_asks(monkeypatch) -> None:
    from mlx_stack.gateway.app import OFF, telemetry

    monkeypatch.delenv("FASTAPI_OTEL_AUTO_CONFIGURE", raising=False)
    assert telemetry() == OFF and not any(OFF.values())
    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    assert telemetry() is None  # FastAPI's defaults: spans, metrics and logs on


def test_a_refusal_is_logged_and_labelled_by_the_model_it_asked_for(cluster: Cluster) -> None:
    """An operator sees what clients were refused: one info line per 4xx with its request
    id, status, code and param; and a 400 for a served model counts under that model."""
    synthetic_workers(cluster, "node-a")
    url = cluster.gateway("--log-level", "info")
    bad = {"model": "syn", "messages": [{"role": "user", "content": "x"}], "n": 2}
    refused = httpx.post(f"{url}/v1/chat/completions", json=bad, timeout=30,
                         headers={"x-request-id": "refused-1"})
    assert refused.status_code == 400
    assert refused.headers["x-request-id"] == "refused-1"
    missing = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                         json={**bad, "model": "no-such-model", "n": 1})
    assert missing.status_code == 404
    samples = wait_for("both refusals counted", lambda: s if total(
        s := scrape(url), "mlx_stack_requests_total") == 2 else None)
    assert value(samples, "mlx_stack_requests_total", model="syn", status="400") == 1
    assert value(samples, "mlx_stack_requests_total", model="unknown", status="404") == 1
    gateway = next(p for p in cluster.procs if p.name.startswith("gateway"))
    lines = wait_for("the refusals logged", lambda: [
        line for line in gateway.output().splitlines() if "request_refused" in line
        ] if gateway.output().count("request_refused") == 2 else None)
    assert "request=refused-1 status=400" in lines[0]
    assert "code=unsupported_parameter param=n" in lines[0]
    assert f"request={missing.headers['x-request-id']} status=404" in lines[1]
    assert "code=model_not_found param=model" in lines[1]


def test_the_grafana_dashboard_asks_only_for_families_the_gateway_serves(
        cluster: Cluster) -> None:
    """Every metric deploy/grafana's panels query is among a live gateway's samples, so
    a renamed family cannot leave a panel empty unnoticed."""
    board = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
    asked = {name for path in board.glob("*.json")
             for name in re.findall(r"mlx_stack_[a-z_]+", path.read_text())}
    assert len(asked) >= 10
    synthetic_workers(cluster, "node-a")
    url = cluster.gateway()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    client.chat.completions.create(model="syn", max_tokens=3,
                                   messages=[{"role": "user", "content": "hi"}])
    served = wait_for("a scrape with the broker's figures", lambda: {
        name for name, _ in s} if value(s := scrape(url), "mlx_stack_broker_up") == 1
        and value(s, "mlx_stack_requests_total", model="syn", status="200") else None)
    assert asked <= served, asked - served
