"""The OpenAI-compatible HTTP surface: FastAPI in front of :class:`BrokerClient`.

Each HTTP request becomes one broker job. The handler waits for the job's ACCEPTED
before it answers, so that errors known up front (unknown model, full queue, no worker)
get their real HTTP status and every response names the node and worker that served it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

from common import heap
from common import messages as msgs
from common.config import Settings
from common.generation import GenerationRequest
from common.logs import log_event
from common.meshkeys import load_keys
from common.names import resolve_name
from common.status import ModelEntry
from gateway import anthropic, dashboard, errors, limits
from gateway.anthropic import MessagesBody, MessagesRequest
from gateway.anthropic import Shape as MessageShape
from gateway.attempts import JobError, Served
from gateway.auth import ApiKeys
from gateway.client import BrokerClient
from gateway.history import History
from gateway.limits import StreamSlot
from gateway.metrics import Metrics, RequestMetrics
from gateway.responses import Shape as ResponseShape
from gateway.responses_request import IGNORED_HEADER, ResponsesRequest
from gateway.routes import JsonBodyRoute
from gateway.schemas import ChatCompletionRequest, CompletionRequest, Unsupported
from gateway.shaping import Completion, Shape, collect, headers


class ClientGone(Exception):
    """The HTTP client disconnected; its job has been cancelled."""


@asynccontextmanager
async def until_disconnect(request: Request) -> AsyncIterator[None]:
    """Run the body unless the client disconnects first: then cancel it (which cancels
    the broker job) and raise :class:`ClientGone`.

    The body runs in the request's own task and a watcher cancels it, rather than a task
    for the body: that would send the SUBMIT a turn of the event loop later, and each
    turn cost a tenth of a millisecond of the first token's time on the 2-vCPU VM
    where this was measured."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()
    if gone:  # cancelled, but the cancel did not land (3.11's wait_for can swallow one)
        task.uncancel()
        raise ClientGone


class SlotStream(EventSourceResponse):
    """The SSE response of a streamed completion: it holds its client's stream slot and
    frees it when the response is over, however it ends (finished, failed, client gone)."""

    def __init__(self, events: AsyncIterator[bytes], slot: StreamSlot,
                 headers: dict[str, str]) -> None:
        super().__init__(events, sep="\n", headers=headers)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        """One event out. sse-starlette opens an anyio cancel scope around every send for
        its ``send_timeout``; with none set (ours) the scope can never fire, yet it was a
        sixth of the gateway's CPU for a streamed token (py-spy): so send straight on.
        (A private method of sse-starlette 3.x, hence the version bound in pyproject.)"""
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
        else:
            await send(message)


log = logging.getLogger("gateway")


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
    app.state.client = client
    metrics = Metrics(client)
    history = History(client, metrics)
    errors.install(app)
    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees 413s too
    streams = limits.StreamLimit(settings.max_streams_per_client)
    names = settings.name_map

    async def complete(request: Request, body: ChatCompletionRequest | CompletionRequest,
                       chat: bool) -> Any:
        return await run(request, body, lambda request_id, served: Completion(
            chat, request_id, served.model_id, body.include_usage,
            logprobs=body.logprobs is not None and body.logprobs is not False))

    async def run(request: Request, body: ChatCompletionRequest | CompletionRequest,
                  shape_for: Callable[[str, Served], Shape],
                  more_headers: dict[str, str] | None = None) -> Any:
        """Check ``body``, hold a stream slot if it streams, and answer it in the shape
        ``shape_for(request_id, served)`` makes (with ``more_headers`` on the answer)."""
        generation = body.to_generation(settings.default_max_tokens
                                        or settings.max_tokens_limit)
        refusal = limits.check_request(settings, body, generation)
        if refusal is not None:
            return refusal
        slot = None
        if body.stream:
            peer = request.client.host if request.client else "unknown"
            slot = streams.acquire(peer)
            if slot is None:
                return streams.refusal(peer)
        response: Any = None
        try:
            response = await answer(request, body.model, generation, shape_for, slot,
                                    more_headers or {})
        finally:
            if slot is not None and not isinstance(response, SlotStream):
                slot.release()  # no stream opened (an error, or the client left)
        return response

    async def answer(request: Request, model: str, generation: GenerationRequest,
                     shape_for: Callable[[str, Served], Shape],
                     slot: StreamSlot | None, more_headers: dict[str, str]) -> Any:
        """Run the job: a :class:`SlotStream` holding ``slot`` when streamed, else one body.
        ``model`` is the client's name for it; the mesh's is the one the ``[models] names``
        setting maps it to (Claude Code asks for ``claude-...``), for every API alike."""
        request_id = request.state.request_id
        asked, model = model, resolve_name(model, names)
        events = metrics.observe(request, model, client.run(model, generation, request_id))
        try:
            async with until_disconnect(request):
                try:
                    served = await anext(events)
                except JobError as exc:
                    if exc.code != msgs.ErrorCode.MODEL_NOT_FOUND or asked == model:
                        raise
                    raise JobError(exc.code, f"{exc.message} (the [models] names setting "
                                   f"maps '{asked}' to '{model}')", exc.param) from None
                assert isinstance(served, Served)  # the worker started the request
                shape = shape_for(request_id, served)
                if slot is not None:
                    return SlotStream(shape.stream(events), slot,
                                      headers(request_id, served) | more_headers)
                answer = await collect(events)
        except ClientGone:
            return Response(status_code=499)  # nobody is left to read it
        return JSONResponse(shape.whole(answer),
                            headers=headers(request_id, served) | more_headers)

    keys = [Depends(ApiKeys(settings.api_key_list, load_keys(settings.home)))]
    v1 = APIRouter(prefix="/v1", dependencies=keys)
    generate = APIRouter(prefix="/v1", dependencies=keys, route_class=JsonBodyRoute)
    """The routes that take a request body and generate: on a token's way (routes.py)."""

    @generate.post("/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        """Create a chat completion (streamed with ``stream: true``)."""
        return await complete(request, body, chat=True)

    @generate.post("/responses")
    async def responses(request: Request, body: ResponsesRequest) -> Any:
        """Create a model response (the Responses API, stateless; streamed with
        ``stream: true`` as typed events). Hosted tools are left out of the prompt, named
        in a header and logged."""
        asked = body.to_chat()
        more_headers = {}
        if asked.ignored:
            more_headers[IGNORED_HEADER] = ",".join(asked.ignored)
            log_event(log, "tools_ignored", request=request.state.request_id,
                      tools=more_headers[IGNORED_HEADER])
        return await run(request, asked.chat, lambda request_id, served: ResponseShape(
            request_id, body, served.model_id, asked.tools), more_headers)

    @generate.post("/messages")
    async def messages(request: Request, body: MessagesRequest) -> Any:
        """Create a message (Anthropic's Messages API, stateless; streamed with
        ``stream: true`` as Anthropic's events)."""
        try:
            response = await run(request, body.to_generate(settings.max_tokens_limit),
                                 lambda request_id, served: MessageShape(request_id,
                                                                         served.model_id))
        except (Unsupported, JobError) as exc:
            exc.param = anthropic.field(exc.param)
            raise
        return errors.for_route(request.url.path, response)  # a refusal: Anthropic's shape

    @generate.post("/messages/count_tokens")
    async def count_tokens(request: Request, body: MessagesBody) -> Any:
        """Count a message request's input tokens: an estimate from its characters (the
        gateway has no tokenizer; the answer's ``usage`` has the model's own count)."""
        return JSONResponse({"input_tokens": body.estimate_tokens()})

    @generate.post("/completions")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        """Create a text completion (streamed with ``stream: true``)."""
        return await complete(request, body, chat=False)

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

