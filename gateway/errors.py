"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for
every failure the gateway can answer with, and the body-size guard. On the Anthropic
Messages routes (``/v1/messages...``) the same errors are in Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}``, with the same status."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_stack.common.logs import log_event
from mlx_stack.common.messages import ErrorCode
from mlx_stack.gateway.attempts import JobError
from mlx_stack.gateway.auth import Unauthorized
from mlx_stack.gateway.schemas import Unsupported

# ErrorCode -> (HTTP status, OpenAI error type)
STATUS: dict[str, tuple[int, str]] = {
    ErrorCode.MODEL_NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.QUEUE_FULL: (429, "rate_limit_error"),
    ErrorCode.NO_WORKER: (503, "server_error"),
    ErrorCode.NO_BROKER: (503, "server_error"),
    ErrorCode.WORKER_LOST: (503, "server_error"),
    ErrorCode.DEADLINE: (504, "timeout_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
}
RETRY_AFTER_S = 1
Handler = Callable[[Request, Any], Awaitable[Response]]
ANTHROPIC_PATH = "/v1/messages"
"""Routes under this path answer errors in Anthropic's shape."""
ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}
"""HTTP status -> Anthropic's error type (its API's own pairs; 503, no worker or broker
for now, is the mesh's overload)."""
log = logging.getLogger("gateway")


def error_body(message: str, type_: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status,
                        headers=headers)


def anthropic_body(status: int, message: str) -> dict[str, Any]:
    """An error in Anthropic's shape for an HTTP ``status``."""
    type_ = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else
                                "invalid_request_error")
    return {"type": "error", "error": {"type": type_, "message": message}}


def for_route(path: str, response: Response) -> Response:
    """``response``, an error in OpenAI's shape, in the shape of the API at ``path``:
    Anthropic's on the Messages routes, unchanged elsewhere (and for anything else)."""
    if (not path.startswith(ANTHROPIC_PATH) or response.status_code < 400
            or not isinstance(response, JSONResponse)):
        return response
    error = json.loads(bytes(response.body))["error"]
    message = error["message"]
    if error.get("param") and not message.startswith("Invalid value for"):
        message = f"{error['param']}: {message}"  # as Anthropic names the field at fault
    headers = {k: v for k, v in response.headers.items()
               if k.lower() not in ("content-length", "content-type")}
    return JSONResponse(anthropic_body(response.status_code, message),
                        status_code=response.status_code, headers=headers)


def job_error_body(exc: JobError) -> tuple[int, dict[str, Any]]:
    status, type_ = STATUS.get(exc.code, (500, "server_error"))
    param = "model" if exc.code == ErrorCode.MODEL_NOT_FOUND else exc.param
    return status, error_body(exc.message, type_, exc.code, param)


def job_error_response(exc: JobError) -> JSONResponse:
    status, body = job_error_body(exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Make every error the app can raise answer in OpenAI's shape (Anthropic's on its
    routes: :func:`for_route`)."""

    def handler(kind: type[Exception]) -> Callable[[Handler], Handler]:
        def register(answer: Handler) -> Handler:
            async def shaped(request: Request, exc: Any) -> Response:
                return for_route(request.url.path, await answer(request, exc))

            app.add_exception_handler(kind, shaped)
            return answer

        return register

    @handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"Malformed JSON body: {first.get('msg', '')}; send "
                                  "a JSON object with Content-Type: application/json.",
                                  code="invalid_json")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        where = f"'{param}'" if param else "the body"
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        return error_response(400, f"Invalid value for {where}: {problems}",
                              code="invalid_value", param=param)

    @handler(Unsupported)
    async def _unsupported(_: Request, exc: Unsupported) -> JSONResponse:
        return error_response(400, str(exc), code="unsupported_parameter", param=exc.param)

    @handler(Unauthorized)
    async def _unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        return error_response(401, str(exc), code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    @handler(JobError)
    async def _job(_: Request, exc: JobError) -> JSONResponse:
        return job_error_response(exc)

    @handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:  # not UTF-8, mostly
            return error_response(400, "Malformed JSON body: it could not be read as UTF-8 "
                                  "JSON; send a JSON object with Content-Type: "
                                  "application/json.", code="invalid_json")
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "body_too_large" if exc.status_code == 413 else None
        return error_response(exc.status_code, str(exc.detail), type_, code)

    @handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        """Even a bug answers in OpenAI's shape (Starlette's default is plain text); the
        traceback still goes to the log."""
        log_event(log, "request_failed", logging.ERROR, error=repr(exc)[:300])
        return error_response(500, "internal error in the gateway; see its log",
                              "server_error", ErrorCode.INTERNAL)


BODY_PARSE_ERROR = "There was an error parsing the body"
"""FastAPI's detail when it cannot read a body at all (as opposed to invalid JSON)."""


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets 413 before it is parsed, whether it
    declares its length (refused at once) or streams in chunks (refused when the count
    passes the limit; FastAPI re-raises an HTTPException from the body read as it is)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _message(self) -> str:
        return (f"Request body exceeds {self.limit} bytes; send a smaller request or raise "
                "MLX_STACK_MAX_BODY_BYTES.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, self._message(), code="body_too_large")
            return await for_route(scope["path"], response)(scope, receive, send)
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)
