"""One job attempt's messages at the gateway, as the broker client delivers them.

They come two ways: from the broker (ACCEPTED, FAIL, FINAL, and relayed PARTIALs) and
straight from the worker (PARTIALs and FINAL, gateway/streams.py), so they need not
arrive in the order they were sent. The inbox puts them back in order:

- every worker message names its dispatch (``<job id>/<n>``, see :class:`~common.messages.Job`).
  A dispatch's frames are taken after its ACCEPTED (held until it comes), an earlier
  dispatch's are dropped, and a new dispatch after output reached the client is a loss
  (the broker could not know, so it ran the job again from the start: resubmit from
  what the client has seen);
- PARTIALs must come in sequence (a gap is a lost frame: resubmit), and those that
  arrived together are merged into one, so that one SSE event carries them;
- a FINAL is taken once every PARTIAL it counts (``parts``) has been: the broker's copy
  may overtake the last direct PARTIALs. If they do not follow within
  :data:`FINAL_WAIT_S`, they were lost.
"""

from __future__ import annotations

import asyncio
import collections

from common import messages as msgs

FINAL_WAIT_S = 2.0
"""Longest a FINAL waits for the PARTIALs it counts (on their direct way, normally the
faster one) before they count as lost."""

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
        """Wakes the waiter at :attr:`_alarm_at` (the deadline, or a FINAL's wait): one
        timer per inbox, not a timeout per message, for the same reason."""
        self._alarm_at = 0.0
        self.deadline = deadline  # loop time
        self.dispatch = -1
        """The dispatch whose ACCEPTED came last: the one whose frames are taken."""
        self.seq = 0
        """The next PARTIAL expected of it."""
        self.output = False
        """Whether output of this attempt was taken (went to the client)."""
        self._ready: collections.deque[Message | Lost] = collections.deque()
        """Taken before the queue: held frames whose turn came."""
        self._early: list[Message] = []
        """Frames of a dispatch whose ACCEPTED has not come yet."""
        self._final: msgs.Final | None = None
        self._final_by = 0.0

    def put(self, msg: Message | Lost) -> None:
        self._arrived.append(msg)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Message | Lost:
        """The next message in order (see the module docstring); raises TimeoutError at
        the deadline."""
        while True:
            if self._final is not None and self._final.parts <= self.seq:
                final, self._final = self._final, None
                return final
            msg = await self._get()
            if isinstance(msg, Lost):
                return msg
            number = dispatch_of(msg.job_id)
            if number is not None and number != self.dispatch:
                if number < self.dispatch:
                    continue  # an earlier dispatch's frame, late
                if not isinstance(msg, msgs.Accepted):
                    self._early.append(msg)
                    continue
                if self.output:
                    return Lost("the job was dispatched again after its output reached "
                                "the client", "mid_stream")
                self.dispatch, self.seq, self._final = number, 0, None
                self._ready.extend(m for m in self._early if dispatch_of(m.job_id) == number)
                self._early = [m for m in self._early if dispatch_of(m.job_id) > number]
                return msg
            if isinstance(msg, msgs.Partial):
                return self._partial(msg)
            if isinstance(msg, msgs.Final) and msg.parts > self.seq:
                self._final = msg
                self._final_by = asyncio.get_running_loop().time() + FINAL_WAIT_S
                continue
            return msg

    async def _get(self) -> Message | Lost:
        if self._ready:
            return self._ready.popleft()
        if self._arrived:
            return self._arrived.popleft()
        until = self.deadline if self._final is None else min(self.deadline, self._final_by)
        loop = asyncio.get_running_loop()
        if self._alarm is None or self._alarm_at != until:
            self._disarm()
            self._alarm, self._alarm_at = loop.call_at(until, self._ring), until
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._arrived:
            return self._arrived.popleft()
        if until < self.deadline:  # the alarm rang
            return Lost(f"PARTIALs {self.seq}..{self._final.parts - 1} did not follow "
                        "their FINAL", "lost_frame")
        raise TimeoutError

    def _ring(self) -> None:
        self._alarm = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """The attempt is over: a timer left set would hold the inbox until the request's
        deadline."""
        self._disarm()

    def _disarm(self) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None

    def _partial(self, msg: msgs.Partial) -> msgs.Partial | Lost:
        """Check ``msg``'s place in the sequence and merge the PARTIALs queued behind it."""
        if msg.seq != self.seq:
            return Lost(f"expected PARTIAL {self.seq}, got {msg.seq}", "lost_frame")
        self.seq += 1
        while self._ready or self._arrived:
            if not self._ready:
                self._ready.append(self._arrived.popleft())
            more = self._ready[0]
            if not (isinstance(more, msgs.Partial) and more.job_id == msg.job_id
                    and more.seq == self.seq):
                break
            self._ready.popleft()
            msg.absorb(more)
            self.seq += 1
        self.output = self.output or msg.has_output
        return msg
