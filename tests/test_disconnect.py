"""``until_disconnect``: a client that leaves cancels the request's own task, and only
that cancellation becomes :class:`ClientGone`. A real Starlette request over an ASGI
``receive`` that says ``http.disconnect`` when the test lets it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.requests import Request

from mlx_stack.gateway.handlers import ClientGone, until_disconnect

SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


def request_that_leaves(left: asyncio.Event) -> Request:
    """A request whose client disconnects once ``left`` is set."""
    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    return Request(SCOPE, receive)


async def run(body: Any, leave: bool) -> tuple[BaseException | None, int]:
    """Run ``body`` under ``until_disconnect`` in a task of its own, the client leaving
    once the body started when ``leave``; (what the handler raised, its task's cancel
    count then)."""
    left = asyncio.Event()
    started = asyncio.Event()
    outcome: dict[str, Any] = {"error": None}

    async def handler() -> None:
        try:
            async with until_disconnect(request_that_leaves(left)):
                started.set()
                await body()
        except BaseException as exc:  # what it raised is the result
            outcome["error"] = exc
        outcome["cancelling"] = asyncio.current_task().cancelling()  # type: ignore[union-attr]

    task = asyncio.create_task(handler())
    await asyncio.wait_for(started.wait(), 5)
    if leave:
        left.set()
    await asyncio.wait([task], timeout=5)
    assert task.done(), "the handler did not end"
    return outcome["error"], outcome["cancelling"]


def test_a_client_that_leaves_cancels_the_body() -> None:
    async def body() -> None:
        await asyncio.sleep(30)

    error, cancelling = asyncio.run(run(body, leave=True))
    assert isinstance(error, ClientGone)
    assert cancelling == 0  # uncancelled: the handler may still answer (a 499)


def test_a_body_that_ends_first_is_left_alone() -> None:
    async def body() -> None:
        await asyncio.sleep(0)

    error, cancelling = asyncio.run(run(body, leave=False))
    assert error is None and cancelling == 0


def test_a_cancel_the_body_swallowed_still_means_the_client_left() -> None:
    """Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that lands as its
    inner future completes: the body then returns normally, but the client is gone."""
    async def body() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as wait_for can
            await asyncio.sleep(30)

    error, cancelling = asyncio.run(run(body, leave=True))
    assert isinstance(error, ClientGone)
    assert cancelling == 0


def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    """The server shutting down cancels handlers too: that is not a client leaving."""
    async def main() -> bool:
        left = asyncio.Event()
        started = asyncio.Event()

        async def handler() -> None:
            async with until_disconnect(request_that_leaves(left)):
                started.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(handler())
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        await asyncio.wait([task], timeout=5)
        return task.cancelled()

    assert asyncio.run(main())
