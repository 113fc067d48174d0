"""The batch loop's thread -> the worker's I/O thread: what goes to the broker.

The only object the two threads share, so it holds the only lock between them. Engine
threads append messages (a relayed job's frames, RELEASEs, FAILs) under the lock and wake
the I/O loop (one byte on a pipe the loop polls) only when the list was empty: an idle
worker sends each message at once, a busy one sends whatever piled up in one go, a
job's PARTIALs that wait together merged into one frame (a fast engine emits a token
every few microseconds; one frame each would make every hop pay per token, and a loaded
machine fall further behind).

It also keeps, without waking anyone, the direct jobs whose output began: the I/O thread
tells the broker in its next heartbeat (see :attr:`common.messages.Heartbeat.streamed`).
"""

from __future__ import annotations

import contextlib
import os
import threading

from mlx_stack.common.messages import Message, Partial


class Outbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Message] = []
        self._open: dict[str, Partial] = {}
        """Job -> its PARTIAL that waits last in :attr:`_items`, which a next one joins."""
        self._streamed: list[str] = []
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)

    @property
    def fd(self) -> int:
        """Readable when messages wait: register it with the I/O loop's poller."""
        return self._read

    def put(self, msg: Message) -> bool:
        """Called by the batch loop's thread. True when ``msg``, a PARTIAL, joined the
        job's PARTIAL waiting before it (its number is then not used)."""
        job_id: str = msg.job_id  # type: ignore[attr-defined]  (a job's messages only)
        with self._lock:
            waiting = self._open.get(job_id) if isinstance(msg, Partial) else None
            if waiting is not None:
                waiting.absorb(msg)
                return True
            self._items.append(msg)
            if isinstance(msg, Partial):
                self._open[job_id] = msg
            else:
                self._open.pop(job_id, None)
            wake = len(self._items) == 1
        if wake:
            os.write(self._write, b"\0")
        return False

    def take(self) -> list[Message]:
        """Everything waiting, in order. Called by the I/O loop."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._read, 65536)  # drain wake-ups first: a later put wakes again
        with self._lock:
            items, self._items = self._items, []
            self._open.clear()
        return items

    def streamed(self, job_id: str) -> None:
        """Batch loop's thread: a direct job's output began (no wake-up: it waits for the
        heartbeat)."""
        with self._lock:
            self._streamed.append(job_id)

    def take_streamed(self) -> list[str]:
        """I/O thread: the direct jobs whose output began since the last call."""
        with self._lock:
            jobs, self._streamed = self._streamed, []
        return jobs

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)
