"""How the completion routes run a request: FastAPI documents them, this runs them.

FastAPI's generic request handler reads the body, parses its content type with the
``email`` package, decodes the JSON, solves the dependencies and validates the decoded
body: a third of the gateway's CPU before a request's SUBMIT left, and about 0.25 ms of
its first token's time on the 2-vCPU VM where it was measured (A/B in
docs/benchmarks/vs-litellm.md). The completion routes need little of that generality:
one JSON body that is one pydantic model, and dependencies that take the request.

:class:`JsonBodyRoute` is a FastAPI route class (``APIRouter(route_class=...)``, FastAPI's
own way to customise how a route handles requests). FastAPI still derives everything
else from the endpoint's signature (the OpenAPI schema, the docs); a request runs in a
few calls: each dependency, pydantic's JSON parser on the body, the endpoint. Errors take
FastAPI's paths, so they answer as before (gateway/errors.py):
- a body that is not JSON, or not valid, raises :class:`RequestValidationError` with the
  same ``loc`` (prefixed ``body``) and error types FastAPI's handler gives;
- a body sent without a JSON content type is refused, as FastAPI's strict content type
  refuses it (a browser's cross-site "simple" POST cannot set one).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect


def is_json(content_type: str) -> bool:
    """Whether a Content-Type header names JSON (``application/json``, ``...+json``)."""
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/")
                                          and kind.endswith("+json"))


class JsonBodyRoute(APIRoute):
    """A route whose endpoint is ``async def endpoint(request: Request, body: Model)``
    returning a Response, and whose dependencies are async callables of the request."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint
        hints = typing.get_type_hints(endpoint)
        model = hints[list(inspect.signature(endpoint).parameters)[1]]
        assert issubclass(model, BaseModel), f"{self.path}: the body must be a model"
        dependencies = [d.dependency for d in self.dependencies]

        async def handler(request: Request) -> Response:
            for dependency in dependencies:
                await dependency(request)
            if not is_json(request.headers.get("content-type", "")):  # not worth reading
                raise RequestValidationError([{
                    "type": "model_attributes_type", "loc": ("body",), "input": None,
                    "msg": "send the body as JSON, with Content-Type: application/json"}])
            try:
                raw = await request.body()
            except ClientDisconnect:  # it left while sending: nobody is there to answer
                return Response(status_code=499)
            try:
                body = model.model_validate_json(raw)
            except ValidationError as exc:
                raise RequestValidationError(
                    [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)],
                    body=raw) from None
            request.state.asked = getattr(body, "model", None)  # for a refusal's label
            return await endpoint(request, body)

        return handler
