"""The gateway's limits on what one request, and one client, may ask for.

Each limit is a setting (``MLX_STACK_<NAME>``, ``config.toml``, a ``gateway`` flag) and
each refusal is an OpenAI-format error that names the setting to raise:

* ``max_body_bytes``: 413, enforced before parsing by :class:`gateway.errors.BodyLimit`;
* ``max_messages`` and ``max_tokens_limit``: 400, checked here after the body parsed;
* ``max_streams_per_client``: 429 when one remote address already has that many SSE
  streams open (a stream holds a worker slot for its whole length);
* and a body whose values the mesh protocol cannot carry (integers beyond 64 bits, NaN,
  nesting deeper than the protocol allows) is a 400 here, not a job the broker would
  drop and the client would wait on until the deadline.
"""

from __future__ import annotations

import collections

import msgpack
from fastapi.responses import JSONResponse

from mlx_stack.common import wire
from mlx_stack.common.config import Settings
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.plain import ProtocolError, check_plain
from mlx_stack.gateway import errors
from mlx_stack.gateway.errors import RETRY_AFTER_S
from mlx_stack.gateway.schemas import ChatCompletionRequest, CompletionRequest

RESUME_BYTES_PER_TOKEN = 48
"""Room kept per generated token for a resubmission (its id, and its text, generously)."""
ENVELOPE_BYTES = 4096


def check_request(settings: Settings, body: ChatCompletionRequest | CompletionRequest,
                  generation: GenerationRequest) -> JSONResponse | None:
    """The 400 error for a request over a limit or not carriable, or None if it is fine."""
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > settings.max_messages:
        return errors.error_response(
            400, f"{len(body.messages)} messages exceed this server's limit of "
            f"{settings.max_messages}; send a shorter conversation or raise "
            "MLX_STACK_MAX_MESSAGES.", code="invalid_value", param="messages")
    if generation.max_tokens > settings.max_tokens_limit:
        return errors.error_response(
            400, f"max_tokens={generation.max_tokens} exceeds this server's limit of "
            f"{settings.max_tokens_limit}; ask for fewer or raise MLX_STACK_MAX_TOKENS_LIMIT.",
            code="invalid_value", param="max_tokens")
    fields = generation.to_dict()  # shallow: asdict() would recurse before depth is known
    try:  # as it sits in a SUBMIT (body -> request -> field)
        check_plain({"request": fields})
    except ProtocolError as exc:
        return errors.error_response(
            400, f"The body holds a value this server cannot pass on ({exc}); send "
            "integers within 64 bits, finite numbers and JSON nested less deeply.",
            code="invalid_value")
    # The frame must fit with room for a resubmission's resume tokens and text: JSON and
    # msgpack sizes differ (a 4-byte "1e1," is a 9-byte double), so measure, do not guess.
    size = len(msgpack.packb(fields, use_bin_type=True))
    room = wire.MAX_BODY_BYTES - RESUME_BYTES_PER_TOKEN * generation.max_tokens - ENVELOPE_BYTES
    if size > room:
        return errors.error_response(
            413, f"The request takes {size} bytes on the mesh, over the {max(room, 0)} it can "
            "carry with this max_tokens; send a smaller request or ask for fewer tokens.",
            code="body_too_large")
    return None


class StreamLimit:
    """Counts the SSE streams open per client address and refuses one over the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: collections.Counter[str] = collections.Counter()

    def acquire(self, client: str) -> StreamPermit | None:
        """A permit for a new stream of ``client``, or None if it has too many open."""
        if self.open[client] >= self.limit:
            return None
        self.open[client] += 1
        return StreamPermit(self, client)

    def _release(self, client: str) -> None:
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]

    def refusal(self, client: str) -> JSONResponse:
        return errors.error_response(
            429, f"This client ({client}) already has {self.limit} streams open; wait for "
            "one to finish, or raise MLX_STACK_MAX_STREAMS_PER_CLIENT.",
            type_="rate_limit_error", code="too_many_streams",
            headers={"Retry-After": str(RETRY_AFTER_S)})


class StreamPermit:
    """One open stream of one client. Whoever holds it releases it, once: the request
    handler until the stream's response exists, then that response (gateway/app.py)."""

    def __init__(self, limit: StreamLimit, client: str) -> None:
        self._limit: StreamLimit | None = limit
        self.client = client

    def release(self) -> None:
        if self._limit is not None:
            self._limit._release(self.client)
            self._limit = None
