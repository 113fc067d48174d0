"""The dashboard's pictures in a real headless browser: the topology of a 3-node mesh under
synthetic load, a chart whose latest point is the broker's figure, a SIGKILLed worker
marked on the time axis, and a page that says the broker is down instead of freezing.

Screenshots go to the test's temporary directory, and to ``$DASHBOARD_SCREENSHOTS`` when
it names a directory (``docs/`` for the README's)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_stack.common import meshview
from testkit.harness import Cluster, Mesh, close_and_report, wait_for
from tests.browser import open_page

NODES = {"node-a": 2, "node-b": 1, "node-c": 0}
"""Priorities: node-a coordinates."""
SLOW = ("--slots", "2", "--rate", "25", "--ttft", "0.2")
"""Synthetic workers slow enough that a burst queues for several seconds."""


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """Three brokers on loopback that know each other, node-a first by priority."""
    m = Mesh(tmp_path, NODES)
    try:
        m.start_brokers()
        wait_for("one coordinator of three brokers", lambda: m.coordinator(peers=2))
        yield m
    finally:
        close_and_report(m, request.node)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    yield from open_page(tmp_path)


class Load:
    """Requests sent from threads, each waiting for its whole answer, until stopped."""

    def __init__(self, url: str, plan: dict[str, int], max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.loop, args=(model,), daemon=True)
                        for model, n in plan.items() for _ in range(n)]
        for t in self.threads:
            t.start()

    def loop(self, model: str) -> None:
        while not self.stopping.is_set():
            # A killed worker's or broker's request may fail; the next one goes on.
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{self.url}/v1/chat/completions", timeout=60, json={
                    "model": model, "max_tokens": self.max_tokens, "stream": True,
                    "messages": [{"role": "user", "content": "tell me about the mesh"}]})

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=70)


def latest(page: Any, chart: str, series: str) -> float | None:
    """The latest point of ``series`` in ``chart`` as the page drew it."""
    value = page.get_attribute(f'#{chart} path[data-series="{series}"]', "data-last",
                               timeout=1000) if page.locator(
        f'#{chart} path[data-series="{series}"]').count() else None
    return float(value) if value else None


def shown_boxes(page: Any) -> dict[str, dict[str, str]]:
    return page.evaluate("""() => Object.fromEntries(
        [...document.querySelectorAll('#topology g.node')].map(g => [g.dataset.node,
            {role: g.dataset.role, state: g.dataset.state}]))""")


def event_titles(page: Any, kind: str) -> list[str]:
    return page.locator(f'#chart-tokens g.event[data-kind="{kind}"] title').all_text_contents()


def screenshot(page: Any, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("DASHBOARD_SCREENSHOTS")
    if target:
        shutil.copy(path, Path(target) / path.name)
    print(f"dashboard screenshot: {path}")


def test_three_nodes_under_load_and_a_killed_worker(mesh: Mesh, page: Any,
                                                    tmp_path: Path) -> None:
    workers = {}
    for node, memory in zip(NODES, ("64", "32", "16"), strict=True):
        workers[node] = mesh.start("worker", "--engine", "synthetic", "--model", "syn",
                                   "--mem-total-gb", memory, *SLOW, node=node)
    mesh.start("worker", "--engine", "synthetic", "--model", "coder=fast", *SLOW,
               node="node-c")
    wait_for("four workers at the coordinator", lambda: mesh.status_says(
        "node-a", lambda s: len(s.workers) == 4), timeout=60)
    url = mesh.gateway(node="node-a")
    page.set_default_timeout(30_000)
    page.goto(f"{url}/mesh")
    # 6 slots of syn, 9 requests at a time: 3 wait in the queue.
    load = Load(url, {"syn": 9, "coder": 2}, max_tokens=250)
    try:
        boxes = wait_for("three nodes in the topology",
                         lambda: (b if len(b := shown_boxes(page)) == 3 else None))
        assert boxes == {"node-a": {"role": "coordinator", "state": "live"},
                         "node-b": {"role": "standby", "state": "live"},
                         "node-c": {"role": "standby", "state": "live"}}
        assert page.locator("#topology .badge-text").all_text_contents() == ["coordinator"]

        def queue_matches() -> bool:
            shown = latest(page, "chart-queues", "syn")
            status = mesh.status("node-a")
            if shown is None or status is None:
                return False
            queued = {m.model: m.queued for m in meshview.models(status)}
            return shown > 0 and shown == queued.get("syn")

        # A sample every 2 s and a poll every second: the broker's figure shows within one
        # sample and one refresh of the page, while the queue holds still for seconds.
        wait_for("the queue chart's latest point to be the broker's queue", queue_matches,
                 timeout=30)
        wait_for("tokens flowing", lambda: (latest(page, "chart-tokens", "mesh") or 0) > 0)
        wait_for("first-token times", lambda: latest(page, "chart-ttft", "p90"))
        if os.environ.get("DASHBOARD_SCREENSHOTS"):  # a picture with a minute of history
            wait_for("a minute of samples", lambda: int(
                page.get_attribute("body", "data-samples") or 0) >= 30, timeout=90)
        screenshot(page, tmp_path / "dashboard.png")

        workers["node-b"].kill(signal.SIGKILL)
        titles = wait_for("the lost worker on the time axis",
                          lambda: event_titles(page, "worker_lost"), timeout=30)
        assert any("node-b" in t and "syn" in t for t in titles), titles
        assert "node-b" in page.text_content("#events")
        screenshot(page, tmp_path / "dashboard-worker-lost.png")
    finally:
        load.stop()
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    answered = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("mlx_stack_requests_total{") and 'status="200"' in line)

    def requests_match() -> bool:
        total = page.evaluate("""() => {
            const s = recorded.samples[recorded.samples.length - 1];
            return s ? (s.requests['200'] || 0) : null; }""")
        return total == answered

    wait_for("the requests chart's counts to be /metrics'", requests_match, timeout=15)


def test_the_page_says_when_the_broker_is_down(cluster: Cluster, page: Any,
                                              tmp_path: Path) -> None:
    cluster.worker("--engine", "synthetic", "--model", "syn")
    url = cluster.gateway()
    page.set_default_timeout(30_000)
    page.goto(f"{url}/mesh")
    wait_for("the node on the page", lambda: shown_boxes(page).get("node-a"))
    wait_for("a sample", lambda: int(page.get_attribute("body", "data-samples") or 0) > 0)

    cluster.procs[0].kill(signal.SIGKILL)  # the broker
    wait_for("the page to say the broker is down", lambda: page.text_content(
        "#state").startswith("broker unreachable"), timeout=30)
    polls = int(page.get_attribute("body", "data-polls") or 0)
    wait_for("the page to go on polling",
             lambda: int(page.get_attribute("body", "data-polls") or 0) > polls + 1)
    assert "stale" in (page.get_attribute("#topology", "class") or "")
    assert "node-a" in shown_boxes(page)  # the last picture known, greyed
    wait_for("the broker's loss on the time axis",
             lambda: event_titles(page, "broker_down"), timeout=30)
    screenshot(page, tmp_path / "dashboard-broker-down.png")
