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
  together are merged into one, so that one SSE event carries them;
- a dispatch whose frames came straight from its worker is lost when that connection
  drops (:meth:`Inbox.dropped`): what the worker had queued on it is gone, and the worker
  may have ended the job and never send on it again to find out.
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
        self._via: dict[int, int | None] = {}
        """Dispatch -> the stream connection its ACCEPTED came over (None: relayed by the
        broker). One way per dispatch: all its frames came that way."""
        self._watch: asyncio.TimerHandle | None = None
        """Loses the attempt unless the broker spoke first (:meth:`dropped`)."""

    def put(self, msg: Message | Lost, via: int | None = None) -> None:
        """Take ``msg``; ``via``: the stream connection it came over (None: the broker's
        link)."""
        if isinstance(msg, msgs.Accepted):
            self._via[dispatch_of(msg.job_id) or 0] = via
        self._arrived.append(msg)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def dropped(self, connection: int, wait: float) -> None:
        """The stream connection ``connection`` dropped. If the attempt's latest dispatch
        (an earlier one's frames are dropped) came over it and still does ``wait``
        seconds later, the attempt is lost after what arrived by then. The wait leaves
        the broker the first word, as before this watch: a worker that died is its to
        judge (it runs the job again before any output, or fails it), within its
        heartbeat liveness; what it cannot know is a live worker's output lost with the
        connection after the job ended."""
        if self._via and self._via[max(self._via)] == connection and self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(
                wait, self._lost_with, connection)

    def _lost_with(self, connection: int) -> None:
        self._watch = None
        if self._via[max(self._via)] == connection:  # no later dispatch since
            # As the broker's loss of a worker under the attempt: it counts against
            # max_retries (a request that kills its workers is not run for ever).
            self.put(Lost("the connection its worker streamed over dropped", "mid_stream"))

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
        for timer in (self._alarm, self._watch):
            if timer is not None:
                timer.cancel()
        self._alarm = self._watch = None

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
