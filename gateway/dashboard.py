"""The live mesh dashboard: ``GET /mesh`` (one static page) and ``GET /mesh/status`` (JSON).

The page is a single HTML file with its script and style inline (no build step, no CDN):
it polls ``/mesh/status`` every second. The grouping by node is done in Python
(common/meshview.py, shared with ``mlx-stack mesh``), so that the page only renders and
shows the same figures as the command line.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from common import meshview
from common.status import plain
from gateway.attempts import JobError
from gateway.client import BrokerClient

PAGE = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'")
"""The page loads nothing from anywhere and talks only to this gateway."""
ROUTES = 20
"""Recent routing decisions shown."""
TIMEOUT = 1.0
"""Seconds to wait for the broker; the page polls again a second later anyway."""


async def snapshot(client: BrokerClient) -> dict[str, Any]:
    """The coordinator, nodes, queues and recent routes, from the broker in use."""
    view: dict[str, Any] = {"gateway": {"node_id": client.settings.node_id,
                                        "broker": client.link.endpoint},
                            "up": False, "error": None, "coordinator": None, "nodes": [],
                            "tiers": [], "routes": []}
    try:
        status, routes = await asyncio.gather(
            client.control("status", timeout=TIMEOUT),
            client.control("routes", {"last": ROUTES}, timeout=TIMEOUT))
    except JobError as exc:
        view["error"] = exc.message
        return view
    view.update(up=True, coordinator=meshview.coordinator(status), nodes=meshview.nodes(status),
                tiers=meshview.tiers(status), routes=plain(routes[::-1]))
    return view
