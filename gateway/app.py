"""The OpenAI-compatible HTTP surface: FastAPI in front of :class:`BrokerClient`.

Each HTTP request becomes one broker job. The handler waits for the job's ACCEPTED
before it answers, so that errors known up front (unknown model, full queue, no worker)
get their real HTTP status and every response names the node and worker that served it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from common import protocol as p
from common.config import Settings
from common.logs import log_event
from common.status import ModelEntry
from gateway import dashboard, errors, limits
from gateway.auth import ApiKeys
from gateway.client import BrokerClient, JobError
from gateway.metrics import Metrics, RequestMetrics
from gateway.schemas import ChatCompletionRequest, CompletionRequest

T = TypeVar("T")
log = logging.getLogger("gateway")


class ClientGone(Exception):
    """The HTTP client disconnected; its job has been cancelled."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it (which cancels
    the broker job) and raise :class:`ClientGone`."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone
    return task.result()


class Completion:
    """Shapes chunks and bodies of one chat or text completion, OpenAI style."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False) -> None:
        self.chat = chat
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        obj = f"{kind}.chunk" if chunk and self.chat else kind
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def chunk(self, text: str | None, finish_reason: str | None = None,
              role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
        usage = {"usage": None} if self.include_usage else {}
        return {**self._envelope(chunk=True), "choices": [choice], **usage}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope(chunk=True), "choices": [], "usage": usage}

    def body(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0, "logprobs": None, "finish_reason": finish_reason,
                "message": {"role": "assistant", "content": text, "refusal": None}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": finish_reason}
        return {**self._envelope(chunk=False), "choices": [choice], "usage": usage}


def served_by(accepted: p.Accepted) -> dict[str, str]:
    """Response headers naming where a request ran."""
    return {"x-mlx-stack-node": accepted.node_id, "x-mlx-stack-worker": accepted.worker_id}


def create_app(settings: Settings) -> FastAPI:
    """The gateway application for ``settings`` (the broker client starts with it)."""
    client = BrokerClient(settings)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await client.start()
        yield
        await client.close()

    app = FastAPI(title="mlx-stack gateway", version=p.VERSION, lifespan=lifespan,
                  summary="OpenAI-compatible endpoint of an mlx-stack mesh.")
    app.state.client = client
    metrics = Metrics(client)
    errors.install(app)
    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees 413s too
    streams = limits.StreamLimit(settings.max_streams_per_client)

    async def complete(request: Request, body: ChatCompletionRequest | CompletionRequest,
                       chat: bool) -> Any:
        generation = body.to_generation(settings.default_max_tokens)
        refusal = limits.check_request(settings, body, generation)
        if refusal is not None:
            return refusal
        release = None
        if body.stream:
            peer = request.client.host if request.client else "unknown"
            release = streams.acquire(peer)
            if release is None:
                return streams.refusal(peer)
        response: Any = None
        try:
            response = await answer(request, body, generation, chat, release)
        finally:
            if release is not None and not isinstance(response, EventSourceResponse):
                release()  # no stream opened (an error, or the client left)
        return response

    async def answer(request: Request, body: ChatCompletionRequest | CompletionRequest,
                     generation: p.GenerationRequest, chat: bool,
                     release: Callable[[], None] | None) -> Any:
        """Run the job; a streamed answer calls ``release`` when its stream is over."""
        events = metrics.observe(request, body.model, client.run(body.model, generation))
        try:
            accepted = await until_disconnect(request, anext(events))
            assert isinstance(accepted, p.Accepted)
            shape = Completion(chat, accepted.model_id, body.include_usage)
            if release is not None:
                return EventSourceResponse(stream(events, shape, release), sep="\n",
                                           headers=served_by(accepted),
                                           background=BackgroundTask(call_async, release))
            text, final = await until_disconnect(request, collect(events))
        except ClientGone:
            return Response(status_code=499)  # nobody is left to read it
        return JSONResponse(shape.body(text, final.finish_reason, final.usage),
                            headers=served_by(accepted))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(ApiKeys(settings.api_key_list))])

    @v1.post("/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        """Create a chat completion (streamed with ``stream: true``)."""
        return await complete(request, body, chat=True)

    @v1.post("/completions")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        """Create a text completion (streamed with ``stream: true``)."""
        return await complete(request, body, chat=False)

    def model_card(entry: ModelEntry) -> dict[str, Any]:
        owner = "mlx-stack (synthetic engine)" if entry.engine == "synthetic" else "mlx-stack"
        return {"id": entry.id, "object": "model", "created": started, "owned_by": owner,
                "root": entry.model_id}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        """Every model id and alias a request may name, across the mesh."""
        return {"object": "list",
                "data": [model_card(e) for e in await client.control("models")]}

    @v1.get("/models/{model:path}")
    async def model(model: str) -> Any:
        for entry in await client.control("models"):
            if entry.id == model:
                return model_card(entry)
        return errors.error_response(404, f"The model '{model}' does not exist",
                                     code="model_not_found", param="model")

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

    @app.get("/mesh", include_in_schema=False)
    async def mesh_page() -> HTMLResponse:
        """The live dashboard: one static page that polls ``/mesh/status``."""
        return HTMLResponse(dashboard.PAGE, headers={"Content-Security-Policy": dashboard.CSP})

    @app.get("/mesh/status")
    async def mesh_status() -> dict[str, Any]:
        """The coordinator, every node and the recent routing decisions, as JSON."""
        return await dashboard.snapshot(client)

    return app


async def call_async(fn: Callable[[], None]) -> None:
    """``fn`` as a background task run on the loop: Starlette runs a sync one in a worker
    thread, a thread hop per streamed request for a counter decrement."""
    fn()


async def collect(events: AsyncIterator[p.Message]) -> tuple[str, p.Final]:
    """Join a job's PARTIALs into the whole text."""
    parts: list[str] = []
    async for msg in events:
        if isinstance(msg, p.Partial):
            parts.append(msg.text)
        elif isinstance(msg, p.Final):
            return "".join(parts), msg
    raise JobError(p.ErrorCode.INTERNAL, "the job ended without a final message")


async def stream(events: AsyncIterator[p.Message], shape: Completion,
                 release: Callable[[], None]) -> AsyncIterator[bytes]:
    """SSE events of a streamed completion; a late failure becomes an error event.

    Events are yielded as encoded bytes (sse-starlette passes bytes through untouched),
    and the last chunk, the usage chunk and ``[DONE]`` leave in one write. ``release``
    frees the client's stream slot when the stream ends, however it ends.
    """

    def data(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    if shape.chat:
        yield data(shape.chunk("", role=True))
    try:
        async for msg in events:
            if isinstance(msg, p.Partial) and msg.text:
                yield data(shape.chunk(msg.text))
            elif isinstance(msg, p.Final):
                last = data(shape.chunk(None if shape.chat else "", msg.finish_reason))
                if shape.include_usage:
                    last += data(shape.usage_chunk(msg.usage))
                yield last + DONE
    except JobError as exc:
        yield data(errors.job_error_body(exc)[1])
    except Exception as exc:  # the headers are sent: an error event is all that is left
        log_event(log, "stream_failed", logging.ERROR, error=repr(exc))
        yield data(errors.error_body("internal error while streaming; see the gateway log",
                                     "server_error", p.ErrorCode.INTERNAL))
    finally:
        release()


DONE = b"data: [DONE]\n\n"
