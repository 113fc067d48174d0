"""The batch loop: one thread drives the engine for every job of the worker.

Jobs join the engine's batch as they arrive and leave it when they finish, hit a stop
sequence or are cancelled (their client went away, or their broker was lost), so the
engine decodes all running jobs together (continuous batching) and a freed slot is
refilled at the next step. The I/O thread only hands messages in (:meth:`BatchLoop.put`);
a job the engine took opens its way out (``open``: its ACCEPTED), and everything the loop
produces goes out through ``send`` (worker/ways.py: by the job's way, straight to its
gateway or relayed by the broker).

    loop: wait for a message or for the engine's next token -> start JOBs (ACCEPTED out),
          apply CANCELs -> engine.step() -> each token to its JobRun -> PARTIAL / FINAL /
          FAIL out
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterator

from mlx_stack.common import messages as msgs
from mlx_stack.common.logs import log_event
from mlx_stack.worker.engine import Engine, RequestRefused
from mlx_stack.worker.runner import JobRun

log = logging.getLogger("worker")


class Tick:
    """The heartbeat, handed to the batch loop: time for ``watch``."""


TICK = Tick()
Inbound = msgs.Job | msgs.Cancel | Tick | None


class BatchLoop:
    """Runs ``engine`` for the worker's jobs; :meth:`run` is the loop thread's body.
    ``open`` opens a job's way out once the engine took it, ``watch`` runs at every
    :data:`TICK` (the ways' look at their connections); without them, a loop as in tests
    and benchmarks of the engine alone."""

    def __init__(self, engine: Engine, send: Callable[[msgs.Message], None],
                 count: Callable[[str], None],
                 open: Callable[[msgs.Job], None] | None = None,
                 watch: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._send = send
        self._open = open or (lambda job: None)
        self._watch = watch or (lambda: None)
        self._count = count
        self._inbox: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self._runs: dict[int, JobRun] = {}
        """Running jobs by engine sequence id."""
        self._seqs: dict[str, int] = {}
        """Engine sequence id by job id."""
        self._busy_since: float | None = None
        """When the engine call under way began (monotonic), None between calls: read by
        the I/O thread's watchdog (:meth:`stalled_for`)."""

    def stalled_for(self, now: float) -> float:
        """I/O thread: seconds the engine call under way has run (0 between calls). An
        engine step that never returns shows here while heartbeats still flow."""
        since = self._busy_since
        return 0.0 if since is None else now - since

    @contextlib.contextmanager
    def _engine_call(self) -> Iterator[None]:
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None

    def put(self, msg: Inbound) -> None:
        """From the I/O thread: a JOB to start, a CANCEL to apply, a :data:`TICK` (the
        heartbeat), None to stop the loop."""
        self._inbox.put(msg)

    def run(self) -> None:
        """Serve until ``put(None)``; jobs still running then are cancelled."""
        while True:
            for msg in self._messages():
                if msg is None:
                    for seq in list(self._runs):
                        self._drop(seq).cancel()
                    return
                if isinstance(msg, msgs.Job):
                    self._start(msg)
                elif isinstance(msg, Tick):
                    self._watch()
                elif msg.job_id in self._seqs:
                    self._count("jobs_cancelled")
                    self._drop(self._seqs[msg.job_id]).cancel()
            if self.engine.wait() == 0:
                self._step()

    def _messages(self) -> list[Inbound]:
        """Everything in the inbox; waits for the first only while the engine has no
        token due, so new jobs join the batch between two steps."""
        wait = self.engine.wait()
        try:
            first = self._inbox.get_nowait() if wait == 0 else self._inbox.get(timeout=wait)
        except queue.Empty:
            return []
        messages = [first]
        with contextlib.suppress(queue.Empty):
            while messages[-1] is not None:
                messages.append(self._inbox.get_nowait())
        return messages

    def _start(self, job: msgs.Job) -> None:
        def send(msg: msgs.Message) -> None:
            msg.epoch = job.epoch
            self._send(msg)

        self._count("jobs_started")
        seq = None
        try:
            run = JobRun(self.engine, job, send)
            if run.budget > 0:
                with self._engine_call():
                    # What its prompt cache served: the engine's own count, taken as the
                    # job joins (only insert moves it, and only this thread inserts).
                    before = self.engine.counters["prompt_tokens_reused"]
                    seq = self.engine.insert(run.prompt, run.request, run.budget,
                                             run.prompt_len)
                    run.reused = self.engine.counters["prompt_tokens_reused"] - before
            self._open(job)  # taken: it will not be refused any more
            if run.open():
                self._runs[seq] = run
                self._seqs[job.job_id] = seq
                return
        except RequestRefused as exc:  # before the engine took the job
            self._count("jobs_refused")
            send(msgs.Fail(job_id=job.job_id, error=str(exc), code=msgs.ErrorCode.INVALID_REQUEST,
                           param=exc.param))
            return
        except Exception as exc:  # a bad request or an engine error fails the job only
            if seq is not None:
                self.engine.remove(seq)
            self._fail(job.job_id, exc, send)
            return
        if seq is not None:  # the resume seam ended it, or no budget was left
            self.engine.remove(seq)
        self._count("jobs_done")

    def _step(self) -> None:
        try:
            self._advance()
        except Exception as exc:
            # The batch is lost, not its requests (Metal out of memory, a bad kernel): its
            # jobs fail retryably, so that they run again or resume on another worker as
            # after a lost worker (within max_retries); the loop serves on.
            runs = {seq: self._forget(seq) for seq in list(self._runs)}
            log_event(log, "engine_step_failed", logging.ERROR, error=repr(exc),
                      jobs=",".join(run.job_id for run in runs.values()) or "-",
                      fix="the jobs run again elsewhere; if this repeats, restart the worker "
                      "or give it fewer slots (max_slots)")
            self._count("engine_errors")
            for seq, run in runs.items():
                with contextlib.suppress(Exception):  # the engine may be past helping
                    self.engine.remove(seq)
                self._count("jobs_failed")
                run.send(msgs.Fail(job_id=run.job_id, error=f"engine error: {exc}",
                                   code=msgs.ErrorCode.INTERNAL, retryable=True))

    def _advance(self) -> None:
        """One engine step, each token to its job."""
        with self._engine_call():
            steps = self.engine.step()
        for step in steps:
            run = self._runs.get(step.seq)
            if run is None:
                continue
            if step.token is not None and run.add(step.token, step.logprob):  # a stop: FINAL sent
                if step.done:
                    self._forget(step.seq)
                else:
                    self._drop(step.seq)
            elif step.done:
                self._forget(step.seq)
                run.end(eos=step.token is None)
            else:
                continue
            self._count("jobs_done")

    def _drop(self, seq: int) -> JobRun:
        """Take a job out of the engine's batch (its slot is free at the next step)."""
        self.engine.remove(seq)
        return self._forget(seq)

    def _forget(self, seq: int) -> JobRun:
        run = self._runs.pop(seq)
        del self._seqs[run.job_id]
        return run

    def _fail(self, job_id: str, exc: Exception, send: Callable[[msgs.Message], None]) -> None:
        log_event(log, "job_failed", logging.ERROR, job=job_id, error=repr(exc))
        self._count("jobs_failed")
        send(msgs.Fail(job_id=job_id, error=f"engine error: {exc}", code=msgs.ErrorCode.INTERNAL))
