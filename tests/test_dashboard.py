"""``GET /mesh`` in a real headless browser (Debian chromium driven by Playwright): the
page shows every node of a 3-node cluster, follows a SIGKILLed worker's node out of the
mesh, lists routing decisions, marks a name two models serve as ambiguous, and shows
untrusted names as text, never as HTML."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.harness import Cluster, wait_for
from tests.browser import HOSTILE, open_page


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    yield from open_page(tmp_path)


def shown_nodes(page: Any) -> dict[str, dict[str, str]]:
    """The node rows on screen: node id -> the row's data attributes and cell texts."""
    return page.evaluate("""() => Object.fromEntries(
        [...document.querySelectorAll('#nodes tr[data-node]')].map(tr => [tr.dataset.node,
            {workers: tr.dataset.workers, cells: [...tr.cells].map(td => td.textContent)}]))""")


def test_dashboard_shows_nodes_routes_and_a_killed_worker(cluster: Cluster, page: Any,
                                                          tmp_path: Path) -> None:
    workers = {node: cluster.worker("--engine", "synthetic", "--model", "syn", "--slots", "2",
                                    "--rate", "200", node=node)
               for node in ("node-a", "node-b")}
    # Another model, hostile in name, that also answers to ``syn``: two models, one name.
    workers["node-c"] = cluster.worker("--engine", "synthetic", "--model", f"{HOSTILE}=syn",
                                       "--slots", "2", node="node-c")
    url = cluster.gateway()
    for i in range(3):
        assert httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "syn", "max_tokens": 4,
            "messages": [{"role": "user", "content": f"hello {i}"}]}).status_code == 200

    page.set_default_timeout(30_000)
    page.goto(f"{url}/mesh")
    nodes = wait_for("three nodes on the page",
                     lambda: (n if len(n := shown_nodes(page)) == 3 else None))
    assert sorted(nodes) == ["node-a", "node-b", "node-c"]
    assert nodes["node-a"]["cells"][1] == "coordinator"  # the one broker runs on node-a
    assert all(n["workers"] == "1" for n in nodes.values())
    assert page.text_content("#coordinator") == "node-a"
    assert page.text_content("#epoch") == "1"
    wait_for("three routing decisions", lambda: page.locator(
        "#routes tr[data-job]").count() == 3)
    assert page.locator("#routes tr[data-job] td:last-child").all_text_contents() == ["ok"] * 3
    # syn's two workers, never the other model's, took every request.
    chosen = page.locator("#routes tr[data-job] td:nth-child(5)").all_text_contents()
    assert all(c.startswith(("node-a", "node-b")) for c in chosen), chosen
    # What each worker's prompt cache served, by its RELEASE: of "hello N" (7 tokens to
    # the synthetic engine), nothing for the first, "hello " for a later one there.
    served = page.locator("#routes tr[data-job] td:nth-child(7)").all_text_contents()
    assert all(s in ("0 of 7", "6 of 7") for s in served) and "0 of 7" in served, served
    ambiguous = page.locator('#tiers tr[data-tier="syn"]')
    assert ambiguous.get_attribute("data-ambiguous") == f"{HOSTILE},syn"
    assert f"also served by {HOSTILE}" in ambiguous.locator(".ambiguous").text_content()
    # A hostile name is shown as text: no element is made of it, no script runs.
    assert HOSTILE in nodes["node-c"]["cells"][2]
    assert page.locator("#nodes img, #tiers img, #topology img").count() == 0
    assert page.locator(f'#topology g.model[data-model="{HOSTILE}"]').count() == 1
    assert page.evaluate("document.body.dataset.pwned") is None
    screenshot(page, tmp_path / "dashboard-3-nodes.png")

    workers["node-c"].kill(signal.SIGKILL)
    polls = int(page.get_attribute("body", "data-polls") or 0)
    after = wait_for("node-c to leave the page",
                     lambda: (n if "node-c" not in (n := shown_nodes(page)) else None))
    assert sorted(after) == ["node-a", "node-b"]
    assert int(page.get_attribute("body", "data-polls") or 0) > polls
    screenshot(page, tmp_path / "dashboard-node-c-killed.png")


def screenshot(page: Any, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"dashboard screenshot: {path}")
