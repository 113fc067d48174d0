"""The OpenAI-compatible HTTP surface: FastAPI in front of :class:`BrokerClient`.

:func:`create_app` makes the application: its state (one :class:`~gateway.handlers.Gateway`
on ``app.state``), middleware, and routes. The routes that generate are plain functions
of gateway/handlers.py; the others (models, health, metrics) are small enough to live
here.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST

from mlx_stack.common import heap
from mlx_stack.common import messages as msgs
from mlx_stack.common.config import Settings
from mlx_stack.common.meshkeys import load_keys
from mlx_stack.common.status import ModelEntry
from mlx_stack.gateway import dashboard, errors, handlers, limits
from mlx_stack.gateway.attempts import JobError
from mlx_stack.gateway.auth import ApiKeys
from mlx_stack.gateway.client import BrokerClient
from mlx_stack.gateway.history import History
from mlx_stack.gateway.metrics import Metrics, RequestMetrics
from mlx_stack.gateway.routes import JsonBodyRoute

OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False,
                        "operation_spans": False}


def telemetry() -> TelemetryConfig | None:
    """FastAPI's own OpenTelemetry spans, metrics and logs: off, unless the environment
    asks FastAPI to set up OpenTelemetry (``FASTAPI_OTEL_AUTO_CONFIGURE=true``). The
    gateway's figures are its Prometheus metrics; spans nobody exports still cost every
    request CPU (0.2-0.5 ms off the p90-p99 time to first token here)."""
    if os.getenv("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true":
        return None
    return OFF


def create_app(settings: Settings) -> FastAPI:
    """The gateway application for ``settings`` (the broker client starts with it)."""
    client = BrokerClient(settings)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await client.start()
        heap.settle()
        async with history.running():  # the dashboard's samples, off the request path
            yield
        await client.close()

    app = FastAPI(title="mlx-stack gateway", version=msgs.VERSION, lifespan=lifespan,
                  summary="OpenAI-compatible endpoint of an mlx-stack mesh.",
                  telemetry=telemetry())
    metrics = Metrics(client)
    history = History(client, metrics)
    app.state.gateway = handlers.Gateway(
        settings, client, metrics, limits.StreamLimit(settings.max_streams_per_client),
        settings.name_map)
    errors.install(app)
    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees 413s too

    keys = [Depends(ApiKeys(settings.api_key_list, load_keys(settings.home)))]
    v1 = APIRouter(prefix="/v1", dependencies=keys)
    generate = APIRouter(prefix="/v1", dependencies=keys, route_class=JsonBodyRoute)
    """The routes that take a request body and generate: on a token's way (routes.py)."""

    for path, endpoint in (("/chat/completions", handlers.chat_completions),
                           ("/completions", handlers.completions),
                           ("/responses", handlers.responses),
                           ("/messages", handlers.messages),
                           ("/messages/count_tokens", handlers.count_tokens)):
        generate.add_api_route(path, endpoint, methods=["POST"])

    def model_card(entry: ModelEntry) -> dict[str, Any]:
        """OpenAI's model object, plus what a name resolves to (``root``: the model that
        answers it; a model's ``tiers``; ``ambiguous``: every model that serves a name
        several do) and its context length, by which agents size their prompts (aider
        and litellm read ``context_length`` or vLLM's ``max_model_len``)."""
        owner = "mlx-stack (synthetic engine)" if entry.engine == "synthetic" else "mlx-stack"
        card = {"id": entry.id, "object": "model", "created": started, "owned_by": owner,
                "root": entry.model_id, "tiers": entry.tiers, "ambiguous": entry.ambiguous}
        if entry.context_length:
            card["context_length"] = card["max_model_len"] = entry.context_length
        return card

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        """Every model id and tier a request may name, across the mesh."""
        return {"object": "list",
                "data": [model_card(e) for e in await client.control("models")]}

    @v1.get("/models/{model:path}")
    async def model(model: str) -> Any:
        for entry in await client.control("models"):
            if entry.id == model:
                return model_card(entry)
        return errors.error_response(404, f"The model '{model}' does not exist",
                                     code="model_not_found", param="model")

    app.include_router(generate)
    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 when the broker answers and some model is served, 503 otherwise."""
        try:
            served = await client.control("models", timeout=1.0)
        except JobError as exc:
            return JSONResponse({"status": "unavailable", "error": exc.message},
                                status_code=503)
        status = "ok" if served else "no_models"
        return JSONResponse({"status": status, "models": [e.id for e in served]},
                            status_code=200 if served else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """Prometheus exposition of this gateway's and its broker's figures."""
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(dashboard.router(client, history))

    return app

