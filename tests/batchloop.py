"""A worker's batch loop in a thread of the test, fed JOBs and CANCELs directly (no
sockets): what the worker's I/O thread does, minus the broker."""

from __future__ import annotations

import threading
from types import TracebackType

from mlx_stack.common import messages as msgs
from mlx_stack.worker.batch import BatchLoop
from mlx_stack.worker.engine import Engine

TIMEOUT = 30.0


class RunningLoop:
    """``with RunningLoop(engine) as loop: loop.run(job)``; the loop thread always stops."""

    def __init__(self, engine: Engine) -> None:
        self.sent: list[msgs.Message] = []
        self.counts: dict[str, int] = {}
        self.cancel_after: int | None = None
        """Cancel a job once this many of its tokens were sent (as a client leaving)."""
        self._ended: dict[str, threading.Event] = {}
        self._tokens: dict[str, int] = {}
        self._lock = threading.Lock()
        self.loop = BatchLoop(engine, self._send, self._count)
        self._thread = threading.Thread(target=self.loop.run, daemon=True)

    def __enter__(self) -> RunningLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.loop.put(None)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the batch loop did not stop"

    def start(self, job: msgs.Job) -> None:
        self._ended[job.job_id] = threading.Event()
        self.loop.put(job)

    def wait(self, job_id: str) -> list[msgs.Message]:
        """Every message of ``job_id`` once its FINAL or FAIL was sent."""
        assert self._ended[job_id].wait(TIMEOUT), f"job {job_id} did not end"
        with self._lock:
            return [m for m in self.sent if getattr(m, "job_id", None) == job_id]

    def run(self, job: msgs.Job) -> list[msgs.Message]:
        self.start(job)
        return self.wait(job.job_id)

    def tokens(self, job_id: str) -> int:
        """Tokens of ``job_id`` sent so far."""
        with self._lock:
            return self._tokens.get(job_id, 0)

    def _send(self, msg: msgs.Message) -> None:
        job_id = msg.job_id  # type: ignore[attr-defined]
        with self._lock:
            self.sent.append(msg)
            if isinstance(msg, msgs.Partial):
                self._tokens[job_id] = self._tokens.get(job_id, 0) + len(msg.token_ids)
        if isinstance(msg, msgs.Partial):
            if self.cancel_after is not None and self._tokens[job_id] >= self.cancel_after:
                self.loop.put(msgs.Cancel(job_id=job_id))
        elif isinstance(msg, msgs.Final | msgs.Fail):
            self._ended[job_id].set()

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
