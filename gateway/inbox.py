"""One job attempt's messages at the gateway, as the broker client delivers them.

A dispatch's frames all come one way (worker/ways.py): straight from its worker to the
stream socket (gateway/streams.py), or relayed by the broker. So they arrive in the
order they were sent: ACCEPTED, PARTIALs, FINAL. Besides them come the broker's own
FAILs and a lost broker (:class:`Lost`). The inbox checks what one way cannot promise:

- every worker message names its dispatch (``<job id>/<n>``, see
  :class:`~common.messages.Job`). An earlier dispatch's frames are dropped (its worker was
  purged but was only slow). A later dispatch starts with its first frame, unless output
  of this attempt already reached the client: the broker could not know (the output
  went straight to us, and the worker died before its heartbeat told of it), so it ran
  the job again from its start. Then the attempt is lost: resubmit from what the client
  has seen;
- PARTIALs come in sequence and a FINAL after as many as it counts (``parts``): a frame
  the broker could not pass on is a gap, a lost frame (resubmit). PARTIALs that arrived
  together are merged into one, so that one SSE event carries them.
"""

from __future__ import annotations

import asyncio
import collections

from mlx_stack.common import messages as msgs

Message = msgs.Accepted | msgs.Partial | msgs.Final | msgs.Fail


class Lost:
    """Stands for a job attempt that cannot go on (broker lost, frame lost): resubmit.
    ``kind`` names the failover in the metrics."""

    def __init__(self, reason: str, kind: str = "coordinator") -> None:
        self.reason = reason
        self.kind = kind


def dispatch_of(job_id: str) -> int | None:
    """The dispatch number of a worker's message (None for the broker's own)."""
    number = job_id.rpartition("/")[2] if "/" in job_id else ""
    return int(number) if number.isdigit() else None


class Inbox:
    """The messages of one job attempt, as the broker client delivers them."""

    def __init__(self, deadline: float) -> None:
        self._arrived: collections.deque[Message | Lost] = collections.deque()
        """What was put, in arrival order. A deque and one waiting future, not an
        asyncio.Queue: this is on every token's way, and a Queue's bookkeeping is not."""
        self._waiter: asyncio.Future[None] | None = None
        self._alarm: asyncio.TimerHandle | None = None
        """Wakes the waiter at the deadline: one timer per inbox, not a timeout per
        message, for the same reason."""
        self.deadline = deadline  # loop time
        self.dispatch = -1
        """The dispatch whose frames are taken."""
        self.seq = 0
        """The next PARTIAL expected of it."""
        self.output = False
        """Whether output of this attempt was taken (went to the client)."""

    def put(self, msg: Message | Lost) -> None:
        self._arrived.append(msg)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Message | Lost:
        """The next message (see the module docstring); raises TimeoutError at the
        deadline."""
        while True:
            msg = await self._get()
            if isinstance(msg, Lost):
                return msg
            number = dispatch_of(msg.job_id)
            if number is None:  # the broker's own
                return msg
            if number < self.dispatch:
                continue  # an earlier dispatch's frame, late
            if number > self.dispatch:
                if self.output:
                    return Lost("the job was dispatched again after its output reached "
                                "the client", "mid_stream")
                self.dispatch, self.seq = number, 0
            if isinstance(msg, msgs.Partial):
                return self._partial(msg)
            if isinstance(msg, msgs.Final) and msg.parts != self.seq:
                return Lost(f"FINAL after {self.seq} of its {msg.parts} PARTIALs",
                            "lost_frame")
            return msg

    async def _get(self) -> Message | Lost:
        if self._arrived:
            return self._arrived.popleft()
        loop = asyncio.get_running_loop()
        if self._alarm is None:
            self._alarm = loop.call_at(self.deadline, self._ring)
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._arrived:
            return self._arrived.popleft()
        raise TimeoutError

    def _ring(self) -> None:
        self._alarm = None  # rung: a later wait sets it again, past due
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """The attempt is over: a timer left set would hold the inbox until the request's
        deadline."""
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None

    def _partial(self, msg: msgs.Partial) -> msgs.Partial | Lost:
        """Check ``msg``'s place in the sequence and merge the PARTIALs queued behind it."""
        if msg.seq != self.seq:
            return Lost(f"expected PARTIAL {self.seq}, got {msg.seq}", "lost_frame")
        self.seq += 1
        while self._arrived:
            more = self._arrived[0]
            if not (isinstance(more, msgs.Partial) and more.job_id == msg.job_id
                    and more.seq == self.seq):
                break
            self._arrived.popleft()
            msg.absorb(more)
            self.seq += 1
        self.output = True
        return msg
