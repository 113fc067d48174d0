"""The SSE response of a streamed completion, and the one framework seam it bends.

sse-starlette opens an anyio cancel scope (``move_on_after(send_timeout)``) around every
send, for its ``send_timeout``. With none set (ours) the scope can never fire, yet it was
a sixth of the gateway's CPU for a streamed token (py-spy, 2-vCPU VM). sse-starlette has
no public switch for it: :meth:`PermitStream._send_with_timeout` overrides its private
method (3.x, hence the version bound in pyproject.toml) to send straight on when there is
no timeout, and defers to it otherwise. If an A/B run stops showing the gain, delete the
override: nothing else depends on it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

from mlx_stack.gateway.limits import StreamPermit


class PermitStream(EventSourceResponse):
    """The SSE response of a streamed completion: it holds its client's stream permit and
    frees it when the response is over, however it ends (finished, failed, client gone)."""

    def __init__(self, events: AsyncIterator[bytes], permit: StreamPermit,
                 headers: dict[str, str]) -> None:
        super().__init__(events, sep="\n", headers=headers)
        self.permit = permit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.permit.release()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        """One event out, without a cancel scope that cannot fire (module docstring)."""
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
        else:
            await send(message)
