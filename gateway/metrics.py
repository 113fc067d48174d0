"""Prometheus metrics of one gateway (``GET /metrics``), all named ``mlx_stack_*``.

Two sources. The gateway's own figures (requests, durations, time to first token, tokens,
its resubmissions) live in a registry of this app's own, not the process-wide default, so
several apps in one process (tests) never clash. The mesh's figures (workers, queues,
role, epoch, re-dispatches before the first token) belong to the broker: each scrape asks
it for CONTROL status with a short timeout; when it does not answer, the local figures are
still served and ``mlx_stack_broker_up`` is 0.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_stack.common import messages as msgs
from mlx_stack.common.logs import log_event
from mlx_stack.common.status import COORDINATOR, STANDBY, WORKER_STATES, BrokerStatus, WorkerStatus
from mlx_stack.gateway.attempts import JobError, JobEvent, Piece, Served
from mlx_stack.gateway.client import BrokerClient

SCRAPE_TIMEOUT = 1.0
"""Seconds a scrape waits for the broker's status before serving local figures only."""
REQUEST_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses",
                           "/v1/messages"})
UNKNOWN = "unknown"
"""Model label of requests for a model the mesh does not serve: a client's made-up model
names must not become label values (one time series each)."""
KNOWN_MODELS_TTL = 5.0
"""Seconds the list of served names is trusted when labelling a refused request."""
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
log = logging.getLogger("gateway")
NOT_ADMITTED = frozenset({msgs.ErrorCode.MODEL_NOT_FOUND, msgs.ErrorCode.INVALID_REQUEST})
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_TOKENS = 4096
"""Times to first token kept for the dashboard: a few seconds' worth at the busiest."""
FAILOVERS = ("pre_token", "mid_stream", "coordinator", "lost_frame")


class Metrics:
    """The registry behind ``GET /metrics`` and the instruments the app records into."""

    def __init__(self, client: BrokerClient) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlx_stack_requests", "Completion requests answered, by model and HTTP status.",
            ["model", "status"], registry=self.registry)
        self.duration = Histogram(
            "mlx_stack_request_duration_seconds",
            "Time from request to the end of the response (the whole stream when streamed).",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram(
            "mlx_stack_time_to_first_token_seconds",
            "Time from request to the first generated token.",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter(
            "mlx_stack_tokens_generated", "Completion tokens sent to clients.", ["model"],
            registry=self.registry)
        self.first_tokens: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=FIRST_TOKENS)
        """(monotonic time, seconds) of the latest times to first token, for the
        dashboard's percentiles (the histogram's buckets are too coarse for them)."""
        self.mesh = MeshCollector(client)
        self.registry.register(self.mesh)
        self.client = client
        self.known: set[str] = set()
        """Names a request may use, as the broker last listed them."""
        self._known_at = -KNOWN_MODELS_TTL

    async def label(self, asked: str | None) -> str:
        """The model label of a request refused before the mesh admitted it: the name it
        asked for when the mesh serves that name (a 400 for a field of a real model's
        request is that model's), else :data:`UNKNOWN`. Asks the broker at most once per
        :data:`KNOWN_MODELS_TTL`, and only for refusals."""
        if not asked:
            return UNKNOWN
        if asked not in self.known and time.monotonic() - self._known_at > KNOWN_MODELS_TTL:
            self._known_at = time.monotonic()
            with contextlib.suppress(JobError):
                entries = await self.client.control("models", timeout=SCRAPE_TIMEOUT)
                self.known = {e.id for e in entries}
        return asked if asked in self.known else UNKNOWN

    async def render(self) -> bytes:
        """The exposition text, with the broker's figures as of now."""
        self.mesh.status = await self.mesh.fetch()
        return generate_latest(self.registry)  # no await in between: no other scrape's status

    async def observe(self, request: Request, model: str,
                      events: AsyncIterator[JobEvent]) -> AsyncIterator[JobEvent]:
        """Pass a job stream through, recording time to first token and tokens, and
        labelling the request with ``model`` once the mesh admitted it."""
        started = time.monotonic()
        tokens = None  # the model's token counter, looked up once, at the first token
        async with contextlib.aclosing(events):
            try:
                async for event in events:
                    if isinstance(event, Served):
                        request.state.model = model
                    elif isinstance(event, Piece) and event.tokens:
                        if tokens is None:
                            now = time.monotonic()
                            self.ttft.labels(model).observe(now - started)
                            self.first_tokens.append((now, now - started))
                            tokens = self.tokens.labels(model)
                        tokens.inc(event.tokens)
                    yield event
            except JobError as exc:
                if exc.code not in NOT_ADMITTED:
                    request.state.model = model
                raise


def request_id(scope: Scope) -> str:
    """The client's ``x-request-id`` when it sent a plain one, else a new id."""
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            given = value.decode("latin-1")
            return given if REQUEST_ID.fullmatch(given) else secrets.token_hex(16)
    return secrets.token_hex(16)


class RequestMetrics:
    """ASGI middleware, outermost: gives every request its id (``state.request_id``,
    answered in ``x-request-id``), counts completion requests by model and status, times
    them to the last byte of the response (a streamed completion counts its whole
    stream), and logs every 4xx and 5xx answer of the API (``/v1/``) with its id, code
    and param, so that an operator sees what the clients were refused."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        state = scope.setdefault("state", {})
        state["request_id"] = rid = request_id(scope)
        status = 500  # unless a response starts
        refusal = b""

        async def send_and_watch(message: Message) -> None:
            nonlocal status, refusal
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                if not any(k == b"x-request-id" for k, _ in headers):
                    message["headers"] = [*headers, (b"x-request-id", rid.encode())]
            elif status >= 400 and len(refusal) < 4096:  # an error body: small, one JSON
                refusal += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            model = state.get("model")
            if status >= 400 and scope["path"].startswith("/v1/"):  # not /health's 503
                model = model or await self.metrics.label(state.get("asked"))
                refused(scope["path"], rid, status, model, refusal)
            if scope["path"] in REQUEST_PATHS:
                model = model or UNKNOWN
                self.metrics.requests.labels(model, str(status)).inc()
                self.metrics.duration.labels(model).observe(time.monotonic() - started)


def refused(path: str, rid: str, status: int, model: str | None, body: bytes) -> None:
    """One log line for an error answer: info for a 4xx (the client's to fix), warning for
    a 5xx. Reads OpenAI's ``{"error": {code, param}}`` and Anthropic's ``{"error":
    {type}}``."""
    try:
        error = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    log_event(log, "request_refused", logging.INFO if status < 500 else logging.WARNING,
              request=rid, status=status, path=path, model=model,
              code=error.get("code") or error.get("type"), param=error.get("param"),
              message=str(error.get("message", ""))[:200])


class MeshCollector:
    """Builds the mesh's metric families at scrape time from the broker's status reply
    (set in ``status`` just before collection) and the gateway's failover counters."""

    def __init__(self, client: BrokerClient) -> None:
        self.client = client
        self.status: BrokerStatus | None = None

    async def fetch(self) -> BrokerStatus | None:
        """The broker's CONTROL status, or None if it does not answer in time."""
        try:
            return await self.client.control("status", timeout=SCRAPE_TIMEOUT)
        except JobError:
            return None

    def collect(self) -> Iterator[Metric]:
        status = self.status
        up = GaugeMetricFamily("mlx_stack_broker_up",
                               "1 if the broker answered this scrape's status request.")
        up.add_metric([], 1 if status else 0)
        yield up
        changes = CounterMetricFamily(
            "mlx_stack_broker_changes", "Times this gateway lost its broker (it died, "
            "restarted or redirected to a new coordinator) and moved on.")
        changes.add_metric([], self.client.counters["broker_lost"])
        yield changes
        failovers = CounterMetricFamily(
            "mlx_stack_failovers", "Requests of this gateway moved to another worker, by "
            "kind: pre_token (re-dispatched by the coordinator before any output), "
            "mid_stream and coordinator (resubmitted with resume tokens after a lost worker "
            "or a lost broker), lost_frame. Counted here, so a coordinator change does not "
            "reset them.", labels=["kind"])
        for kind in FAILOVERS:
            failovers.add_metric([kind], self.client.failovers[kind])
        yield failovers
        if status:
            yield from broker_families(status)


def broker_families(status: BrokerStatus) -> Iterator[Metric]:
    """Role, epoch, queues and workers of the broker's status reply."""
    epoch = GaugeMetricFamily("mlx_stack_broker_epoch", "Epoch of the broker in use.")
    epoch.add_metric([], status.epoch)
    yield epoch
    role = GaugeMetricFamily("mlx_stack_broker_role",
                             "1 for the role the broker in use has.",
                             labels=["node", "role"])
    for name in (COORDINATOR, STANDBY):
        role.add_metric([status.node_id, name], 1 if status.role == name else 0)
    yield role
    workers = status.workers
    names = {n for w in workers for n in w.names}
    queue = GaugeMetricFamily("mlx_stack_queue_depth",
                              "Requests waiting for a free slot, by requested model name.",
                              labels=["model"])
    for name in sorted(names | status.queues.keys()):
        queue.add_metric([name], status.queues.get(name, 0))
    yield queue
    by_state = GaugeMetricFamily(
        "mlx_stack_workers", "Live workers by model and state: idle (no job), busy (jobs "
        "and a free slot), full (every slot in use).", labels=["model", "state"])
    for model in sorted({w.model_id for w in workers}):
        mine = [w for w in workers if w.model_id == model]
        for state in WORKER_STATES:
            by_state.add_metric([model, state], sum(w.state == state for w in mine))
    yield by_state
    yield from engine_families(workers)


PROMPT_CACHE_COUNTERS = {
    "prompt_cache_hits": "Requests whose prompt began with a prefix whose KV cache the "
    "worker had kept (only the rest was prefilled).",
    "prompt_cache_misses": "Requests prefilled from their first token.",
    "prompt_tokens_reused": "Prompt tokens not prefilled thanks to the prompt cache.",
    "prompt_tokens_computed": "Prompt tokens prefilled (not served by the prompt cache).",
}


def engine_families(workers: list[WorkerStatus]) -> Iterator[Metric]:
    """The live workers' prompt cache counters and KV cache memory, by model (a worker's
    counters start at 0 when it starts)."""
    models = sorted({w.model_id for w in workers})
    for key, doc in PROMPT_CACHE_COUNTERS.items():
        family = CounterMetricFamily(f"mlx_stack_{key}", doc, labels=["model"])
        for model in models:
            family.add_metric([model], sum(w.load.counters.get(key, 0) for w in workers
                                           if w.model_id == model))
        yield family
    yield reused_ratio(workers, models)
    kv = GaugeMetricFamily("mlx_stack_kv_cache_bytes", "KV cache memory the workers hold "
                           "(running requests and prompt cache), by model.", labels=["model"])
    for model in models:
        kv.add_metric([model], sum(w.load.kv_bytes for w in workers if w.model_id == model))
    yield kv


def reused_ratio(workers: list[WorkerStatus], models: list[str]) -> Metric:
    """The share of prompt tokens the live workers' prompt caches served, by model, since
    they started (for a recent window, divide the rates of the reused and computed
    counters instead); a model whose workers have computed no prompt yet has none."""
    ratio = GaugeMetricFamily(
        "mlx_stack_prompt_tokens_reused_ratio", "Prompt tokens the prompt caches served over "
        "all prompt tokens (reused / (reused + computed)), summed over the live workers of "
        "each model since they started.", labels=["model"])
    for model in models:
        counters = [w.load.counters for w in workers if w.model_id == model]
        reused = sum(c.get("prompt_tokens_reused", 0) for c in counters)
        total = reused + sum(c.get("prompt_tokens_computed", 0) for c in counters)
        if total:
            ratio.add_metric([model], reused / total)
    return ratio
