"""The live mesh dashboard: ``GET /mesh`` (one page), ``GET /mesh/status`` (the mesh now,
JSON) and ``GET /mesh/history`` (its last 15 minutes, JSON).

The page is one HTML file and its scripts, served from the package (no build step, no
CDN, nothing fetched from elsewhere, so it works offline): it polls ``/mesh/status``
every second and ``/mesh/history`` for the samples it has not seen. The topology and the
charts are SVG drawn by the scripts. The grouping by node is done in Python
(common/meshview.py, shared with ``mlx-stack mesh``), so that the page only renders and
shows the same figures as the command line.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from mlx_stack.common import meshview
from mlx_stack.common.status import plain
from mlx_stack.gateway.attempts import JobError
from mlx_stack.gateway.client import BrokerClient
from mlx_stack.gateway.history import History

HERE = Path(__file__).parent
PAGE = (HERE / "dashboard.html").read_text(encoding="utf-8")
SCRIPTS = {name: (HERE / f"{name}.js").read_text(encoding="utf-8")
           for name in ("dashboard_charts", "dashboard_topology", "dashboard")}
"""The page's scripts by name: only these are served (no path reaches the file system)."""
CSP = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""The page loads nothing from anywhere but this gateway, runs no inline script (every
value is set as text by the scripts), and may not be framed."""
ROUTES = 20
"""Recent routing decisions shown."""
TIMEOUT = 1.0
"""Seconds to wait for the broker; the page polls again a second later anyway."""


async def snapshot(client: BrokerClient, history: History) -> dict[str, Any]:
    """The coordinator, nodes (and those lately unreachable), queues and recent routes,
    from the broker in use."""
    settings = client.settings
    view: dict[str, Any] = {"gateway": {"node_id": settings.node_id,
                                        "broker": client.link.endpoint},
                            "heartbeat": {"interval_s": settings.heartbeat_interval,
                                          "timeout_s": settings.peer_timeout},
                            "up": False, "error": None, "coordinator": None, "nodes": [],
                            "unreachable": [], "tiers": [], "routes": []}
    try:
        status, routes = await asyncio.gather(
            client.control("status", timeout=TIMEOUT),
            client.control("routes", {"last": ROUTES}, timeout=TIMEOUT))
    except JobError as exc:
        view["error"] = exc.message
        return view
    view.update(up=True, coordinator=plain(meshview.coordinator(status)),
                nodes=plain(meshview.nodes(status)),
                unreachable=plain(history.changes.unreachable(status)),
                tiers=plain(meshview.tiers(status)), routes=plain(routes[::-1]))
    return view


def router(client: BrokerClient, history: History) -> APIRouter:
    """The dashboard's routes, over ``client``'s broker and ``history``."""
    routes = APIRouter(include_in_schema=False)
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}

    @routes.get("/mesh")
    async def page() -> HTMLResponse:
        """The live dashboard: one static page that polls the two routes below."""
        return HTMLResponse(PAGE, headers=headers)

    @routes.get("/mesh/{name}.js")
    async def script(name: str) -> Response:
        if name not in SCRIPTS:
            return Response(status_code=404)
        return Response(SCRIPTS[name], media_type="text/javascript", headers=headers)

    @routes.get("/mesh/status")
    async def status() -> dict[str, Any]:
        """The coordinator, every node and the recent routing decisions, as JSON."""
        return await snapshot(client, history)

    @routes.get("/mesh/history")
    async def samples(after: int = Query(0, ge=0)) -> dict[str, Any]:
        """The samples and events of the last 15 minutes newer than sequence ``after``."""
        return history.after(after)

    return routes
