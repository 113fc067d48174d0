"""The mesh's last minutes, for the dashboard's time series (``GET /mesh/history``).

A background task of the gateway's lifespan samples every :data:`SAMPLE_S` seconds, off
every request's path: one CONTROL status from the broker it already talks to, plus this
gateway's own figures (requests by status, times to first token, its failovers). Samples
and events live in rings bounded by the window (15 minutes), so memory never grows with
time or load; a page asks only for what it has not seen yet (``after`` a sequence number).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from mlx_stack.common import meshview
from mlx_stack.common.status import BrokerStatus, plain
from mlx_stack.gateway.attempts import JobError
from mlx_stack.gateway.client import BrokerClient
from mlx_stack.gateway.metrics import Metrics

SAMPLE_S = 2.0
"""Seconds between two samples."""
WINDOW_S = 15 * 60.0
"""How far back the history goes."""
TTFT_WINDOW_S = 10.0
"""The times to first token a sample's percentiles are taken over: the last seconds'."""
EVENTS = 500
"""Events kept (a flapping mesh must not grow the list without bound)."""
TIMEOUT = 1.0
"""Seconds a sample waits for the broker's status."""
FAILOVER = "failover"
BROKER_LOST = "broker_lost"
"""The gateway's own kinds of event, beside :mod:`common.meshview`'s."""
FAILOVER_WORDS = {
    "pre_token": "re-dispatched by the coordinator before any output",
    "mid_stream": "resumed on another worker mid-stream",
    "coordinator": "resumed after the broker was lost",
    "lost_frame": "resumed after a missing stream frame",
}
log = logging.getLogger("gateway")


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile of ``values`` (None for none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class History:
    """Rings of samples and events over the last :data:`WINDOW_S`, and the task that
    fills them."""

    def __init__(self, client: BrokerClient, metrics: Metrics, every: float = SAMPLE_S,
                 window: float = WINDOW_S) -> None:
        self.client = client
        self.metrics = metrics
        self.every = every
        self.samples: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=int(window / every) + 1)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS)
        self.changes = meshview.Changes(window)
        self.seq = 0
        self.failovers = collections.Counter(client.failovers)
        self.broker_lost = client.counters["broker_lost"]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Sample in the background for as long as the body runs (the app's lifespan)."""
        task = asyncio.create_task(self.run(), name="mesh-history")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Sample every :data:`SAMPLE_S` (a paced loop, not a wait for anything), until
        cancelled; a failed sample is logged and the next one tried."""
        while True:
            started = time.monotonic()
            try:
                await self.sample()
            except Exception:  # the dashboard must not stop the gateway
                log.exception("mesh history sample failed")
            await asyncio.sleep(max(0.0, self.every - (time.monotonic() - started)))

    async def sample(self) -> dict[str, Any]:
        """Take one sample and its events now; return the sample."""
        now = time.time()
        try:
            status: BrokerStatus | None = await self.client.control("status", timeout=TIMEOUT)
            error = ""
        except JobError as exc:
            status, error = None, exc.message
        self.seq += 1
        events = self.changes.update(status, now, error) + self.own_events(now)
        self.events.extend({**plain(e), "seq": self.seq} for e in events)
        sample = {"seq": self.seq, "time": round(now, 3), "up": status is not None,
                  "requests": self.requests(), **self.first_token_times()}
        if status is not None:
            nodes = meshview.nodes(status)
            sample.update(
                tokens_per_s=round(sum(n.tokens_per_s for n in nodes), 2),
                nodes={n.node_id: n.tokens_per_s for n in nodes},
                queues={m.model: m.queued for m in meshview.models(status)})
        self.samples.append(sample)
        return sample

    def own_events(self, now: float) -> list[meshview.Event]:
        """This gateway's failovers and broker changes since the last sample."""
        events = []
        for kind, count in sorted((self.client.failovers - self.failovers).items()):
            events.append(meshview.event(now, FAILOVER, f"{count} request(s) of this gateway "
                                         f"{FAILOVER_WORDS.get(kind, kind)}"))
        self.failovers = collections.Counter(self.client.failovers)
        lost = self.client.counters["broker_lost"]
        if lost > self.broker_lost:
            events.append(meshview.event(now, BROKER_LOST, "this gateway lost its broker and "
                                         f"moved on to {self.client.link.endpoint}"))
        self.broker_lost = lost
        return events

    def requests(self) -> dict[str, int]:
        """Completion requests this gateway answered since it started, by HTTP status."""
        counts: collections.Counter[str] = collections.Counter()
        for family in self.metrics.requests.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    counts[s.labels["status"]] += int(s.value)
        return dict(sorted(counts.items()))

    def first_token_times(self) -> dict[str, float | None]:
        """p50 and p90 of the times to first token of the last :data:`TTFT_WINDOW_S`."""
        since = time.monotonic() - TTFT_WINDOW_S
        recent = [s for when, s in self.metrics.first_tokens if when >= since]
        return {f"ttft_p{q}": None if (v := percentile(recent, q)) is None else round(v, 4)
                for q in (50, 90)}

    def after(self, seq: int) -> dict[str, Any]:
        """The samples and events newer than ``seq`` (0: all of them), and the window."""
        return {"seq": self.seq, "every_s": self.every,
                "window_s": (self.samples.maxlen or 1) * self.every,
                "samples": [s for s in self.samples if s["seq"] > seq],
                "events": [e for e in self.events if e["seq"] > seq]}
