"""The routes that generate: plain functions of a request and its body.

Each HTTP request becomes one request of the mesh (:meth:`BrokerClient.run`). The handler
waits until a worker started it (:meth:`JobStream.started`) before it answers, so that
errors known up front (unknown model, full queue, no worker, a refusal) get their real
HTTP status and every response names the node and worker that served it. What a handler
needs of the application is one :class:`Gateway` on ``app.state`` (gateway/app.py makes
it and registers these functions as routes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mlx_stack.common import messages as msgs
from mlx_stack.common.config import Settings
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.logs import log_event
from mlx_stack.common.names import resolve_name
from mlx_stack.gateway import anthropic, errors, limits
from mlx_stack.gateway.anthropic import MessagesBody, MessagesRequest
from mlx_stack.gateway.anthropic import Shape as MessageShape
from mlx_stack.gateway.attempts import JobError, JobStream, Served
from mlx_stack.gateway.client import BrokerClient
from mlx_stack.gateway.limits import StreamPermit
from mlx_stack.gateway.metrics import Metrics
from mlx_stack.gateway.responses import Shape as ResponseShape
from mlx_stack.gateway.responses_request import IGNORED_HEADER, ResponsesRequest
from mlx_stack.gateway.schemas import ChatCompletionRequest, CompletionRequest, Unsupported
from mlx_stack.gateway.shaping import Completion, Shape, collect, headers
from mlx_stack.gateway.sse import PermitStream

log = logging.getLogger("gateway")

ShapeFor = Callable[[str, Served], Shape]
"""Makes the answer's shape from the request id and where the request runs."""


@dataclass(frozen=True, slots=True)
class Gateway:
    """What the handlers need of the application: ``app.state.gateway``."""

    settings: Settings
    client: BrokerClient
    metrics: Metrics
    streams: limits.StreamLimit
    """Open SSE streams per client address."""
    names: dict[str, str]
    """The ``[models] names`` setting, parsed once: client name pattern -> mesh name."""


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


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


async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
    """Create a chat completion (streamed with ``stream: true``)."""
    return await complete(request, body, chat=True)


async def completions(request: Request, body: CompletionRequest) -> Any:
    """Create a text completion (streamed with ``stream: true``)."""
    return await complete(request, body, chat=False)


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


async def messages(request: Request, body: MessagesRequest) -> Any:
    """Create a message (Anthropic's Messages API, stateless; streamed with
    ``stream: true`` as Anthropic's events)."""
    limit = gateway_of(request).settings.max_tokens_limit
    try:
        response = await run(request, body.to_generate(limit), lambda request_id, served:
                             MessageShape(request_id, served.model_id))
    except (Unsupported, JobError) as exc:
        exc.param = anthropic.field(exc.param)
        raise
    return errors.for_route(request.url.path, response)  # a refusal: Anthropic's shape


async def count_tokens(request: Request, body: MessagesBody) -> Any:
    """Count a message request's input tokens: an estimate from its characters (the
    gateway has no tokenizer; the answer's ``usage`` has the model's own count)."""
    return JSONResponse({"input_tokens": body.estimate_tokens()})


async def complete(request: Request, body: ChatCompletionRequest | CompletionRequest,
                   chat: bool) -> Any:
    return await run(request, body, lambda request_id, served: Completion(
        chat, request_id, served.model_id, body.include_usage,
        logprobs=body.logprobs is not None and body.logprobs is not False))


async def run(request: Request, body: ChatCompletionRequest | CompletionRequest,
              shape_for: ShapeFor, more_headers: dict[str, str] | None = None) -> Any:
    """Check ``body``, hold a stream permit if it streams, and answer it in the shape
    ``shape_for(request_id, served)`` makes (with ``more_headers`` on the answer)."""
    gateway = gateway_of(request)
    settings = gateway.settings
    generation = body.to_generation(settings.default_max_tokens or settings.max_tokens_limit)
    refusal = limits.check_request(settings, body, generation)
    if refusal is not None:
        return refusal
    permit = None
    if body.stream:
        peer = request.client.host if request.client else "unknown"
        permit = gateway.streams.acquire(peer)
        if permit is None:
            return gateway.streams.refusal(peer)
    response: Any = None
    try:
        response = await answer(request, body.model, generation, shape_for, permit,
                                more_headers or {})
    finally:
        if permit is not None and not isinstance(response, PermitStream):
            permit.release()  # no stream opened (an error, or the client left)
    return response


async def answer(request: Request, model: str, generation: GenerationRequest,
                 shape_for: ShapeFor, permit: StreamPermit | None,
                 more_headers: dict[str, str]) -> Any:
    """Run the job: a :class:`PermitStream` holding ``permit`` when streamed, else one body.
    ``model`` is the client's name for it; the mesh's is the one the ``[models] names``
    setting maps it to (Claude Code asks for ``claude-...``), for every API alike."""
    gateway = gateway_of(request)
    request_id = request.state.request_id
    asked, model = model, resolve_name(model, gateway.names)
    job = JobStream(gateway.metrics.observe(
        request, model, gateway.client.run(model, generation, request_id)))
    try:
        async with until_disconnect(request):
            try:
                served = await job.started()
            except JobError as exc:
                if exc.code != msgs.ErrorCode.MODEL_NOT_FOUND or asked == model:
                    raise
                raise JobError(exc.code, f"{exc.message} (the [models] names setting "
                               f"maps '{asked}' to '{model}')", exc.param) from None
            shape = shape_for(request_id, served)
            if permit is not None:
                return PermitStream(shape.stream(job), permit,
                                    headers(request_id, served) | more_headers)
            whole = await collect(job)
    except ClientGone:
        return Response(status_code=499)  # nobody is left to read it
    return JSONResponse(shape.whole(whole), headers=headers(request_id, served) | more_headers)
