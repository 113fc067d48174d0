"""One job attempt's messages at the gateway, as the broker client's reader delivers them.

The reader task puts every message of a job attempt here; the request's task takes them
one by one. PARTIALs are checked for sequence (a gap is a lost frame: the request is
resubmitted with what the client has seen) and those that arrived together are merged
into one, so that one SSE event carries them.
"""

from __future__ import annotations

import asyncio

from common import protocol as p


class Lost:
    """Stands for a job attempt that cannot go on (broker lost, frame lost): resubmit.
    ``kind`` names the failover in the metrics."""

    def __init__(self, reason: str, kind: str = "coordinator") -> None:
        self.reason = reason
        self.kind = kind


class Inbox:
    """The messages of one job attempt, as the reader task delivers them."""

    def __init__(self, deadline: float) -> None:
        self.queue: asyncio.Queue[p.Message | Lost] = asyncio.Queue()
        self.deadline = deadline  # loop time
        self.seq = 0
        self._held: p.Message | Lost | None = None

    def put(self, msg: p.Message | Lost) -> None:
        self.queue.put_nowait(msg)

    async def next(self) -> p.Message | Lost:
        """The next message. PARTIALs already queued behind it come merged into it (one
        SSE event for what arrived together), and a PARTIAL out of sequence is a loss.
        Each dispatch's worker numbers from 0: an ACCEPTED (a dispatch, the first or one
        after a worker was lost before any output) starts the count again. The broker
        drops an earlier dispatch's frames, and its ACCEPTED comes before the new worker's
        PARTIALs on the same connection."""
        msg, self._held = self._held, None
        if msg is None:
            if self.queue.empty():
                async with asyncio.timeout_at(self.deadline):
                    msg = await self.queue.get()
            else:
                msg = self.queue.get_nowait()
        if isinstance(msg, p.Accepted):
            self.seq = 0
        if not isinstance(msg, p.Partial):
            return msg
        if msg.seq != self.seq:
            return Lost(f"expected PARTIAL {self.seq}, got {msg.seq}", "lost_frame")
        self.seq += 1
        while not self.queue.empty():
            more = self.queue.get_nowait()
            if not (isinstance(more, p.Partial) and more.seq == self.seq):
                self._held = more
                break
            msg.absorb(more)
            self.seq += 1
        return msg
