"""Engine threads -> the worker's I/O loop, with batching that adds no latency.

A fast engine emits a token every few microseconds; one frame per token would make every
hop (worker, broker, gateway, SSE) pay per token. Engine threads append to a list under a
lock and wake the I/O loop (one byte on a pipe the loop polls) only when the list was
empty. An idle worker therefore sends each token at once, and a busy one sends, as one
PARTIAL per job, whatever accumulated while it was sending the previous batch.

PARTIALs are numbered here, as they are sent, so that merging keeps ``seq`` contiguous;
a FINAL says how many there were (``parts``).
"""

from __future__ import annotations

import contextlib
import os
import threading

from common.messages import Fail, Final, Message, Partial


class Outbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Message] = []
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self._seq: dict[str, int] = {}

    @property
    def fd(self) -> int:
        """Readable when messages wait: register it with the I/O loop's poller."""
        return self._read

    def put(self, msg: Message) -> None:
        """Called by engine threads."""
        with self._lock:
            self._items.append(msg)
            wake = len(self._items) == 1
        if wake:
            os.write(self._write, b"\0")

    def take(self) -> list[Message]:
        """Everything waiting, consecutive PARTIALs of a job merged and numbered, in each
        job's order. Called by the I/O loop."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._read, 65536)  # drain wake-ups first: a later put wakes again
        with self._lock:
            items, self._items = self._items, []
        out: list[Message] = []
        open_partials: dict[str, Partial] = {}
        for msg in items:
            if isinstance(msg, Partial):
                merged = open_partials.get(msg.job_id)
                if merged is None:
                    msg.seq = self._seq.get(msg.job_id, 0)
                    self._seq[msg.job_id] = msg.seq + 1
                    open_partials[msg.job_id] = msg
                    out.append(msg)
                else:
                    merged.absorb(msg)
            else:
                if isinstance(msg, Final | Fail):
                    open_partials.pop(msg.job_id, None)
                    parts = self._seq.pop(msg.job_id, None)
                    if isinstance(msg, Final) and parts is not None:  # else: sent direct
                        msg.parts = parts
                out.append(msg)
        return out

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)
