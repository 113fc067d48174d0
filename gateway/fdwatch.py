"""ZeroMQ sockets read from the event loop's own descriptor callbacks, not through pyzmq's
asyncio sockets: the one framework seam of the broker client (gateway/client.py).

What it buys: pyzmq's asyncio sockets make a future, a poller and a reader registration
per wake-up, which on a small machine was a tenth of a millisecond on every token's way
(2-vCPU VM). Here each socket's descriptor (``zmq.FD``) is watched with asyncio's
documented ``loop.add_reader``, and its callback reads what waits and delivers it at
once, so a token reaches its request's task in the next turn of the loop.

What it costs: ZeroMQ's descriptor is edge-triggered and only says "look again" (as
libzmq documents ``ZMQ_FD``), and any send or ``ZMQ_EVENTS`` query can consume the edge
while frames wait. So the reader asks ``ZMQ_EVENTS`` before it sleeps, every send and
read pokes it when frames still wait (:meth:`FdWatch.poke`), and it never sleeps longer
than :data:`LOOK_AGAIN_S`: a missed edge costs that much, never a hang. If an A/B run
stops showing the gain, pyzmq's asyncio sockets replace this module whole.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import zmq

from mlx_stack.common.transport import waiting

LOOK_AGAIN_S = 0.1
"""Longest the reader sleeps without looking at the sockets (a missed wake-up costs this)."""


class FdWatch:
    """The descriptors one reader task watches, and what wakes it."""

    def __init__(self) -> None:
        self._readable = asyncio.Event()
        """Set when a watched descriptor without a callback of its own says "look
        again", or when frames still wait after a read or a send."""

    def watch(self, sock: zmq.Socket, callback: Callable[[], None] | None = None) -> int:
        """Call ``callback`` (by default: wake the reader) when ``sock``'s descriptor says
        "look again"; returns the descriptor, for :meth:`unwatch`."""
        fd = sock.FD
        asyncio.get_running_loop().add_reader(fd, callback or self.wake)
        return fd

    @staticmethod
    def unwatch(fd: int) -> None:
        """Before the socket closes: its descriptor may be reused."""
        asyncio.get_running_loop().remove_reader(fd)

    def wake(self) -> None:
        self._readable.set()

    def poke(self, sock: zmq.Socket | None) -> None:
        """After a read or a send on ``sock``: wake the reader if frames still wait (the
        call may have consumed the descriptor's edge)."""
        if sock is not None and waiting(sock):
            self._readable.set()

    async def wait(self, *socks: zmq.Socket | None) -> None:
        """Until frames may wait on one of ``socks``: after one turn of the loop when they
        do (the streams and handlers run between batches), else until a wake-up or
        :data:`LOOK_AGAIN_S`."""
        self._readable.clear()
        if any(sock is not None and waiting(sock) for sock in socks):
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LOOK_AGAIN_S):
                await self._readable.wait()
