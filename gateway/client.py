"""The gateway's side of the broker protocol: a Lazy Pirate client that owns each request.

One DEALER socket per gateway process, owned by one reader task that polls, then
receives (never a receive wrapped in a cancellable timeout: pyzmq can lose the message),
and that alone replaces the socket when the broker falls silent. Replies are routed by
job id to per-job queues and by request id to CONTROL futures.

The gateway, not the broker, owns a request: it remembers the token ids and text already
streamed to the HTTP client, and when a job is lost (its worker died mid-stream, or the
broker went silent or restarted) it submits it again with those as resume tokens, under a
new job id so late frames of the old attempt are ignored, until the retries or the
deadline run out.

Which broker: this node's own first; a REDIRECT names the coordinator; when the broker
in use falls silent, the next candidate (this node's broker, then the static peers).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from common import protocol as p
from common.config import Settings
from common.control import ControlError, answer, question
from common.logs import log_event
from common.meshkeys import load_keys
from common.transport import BrokerChoice, close_watched, configure, disconnected, watch_disconnects

log = logging.getLogger("gateway")

DRAIN = 1000
RESUBMIT_CODES = frozenset({p.ErrorCode.WORKER_LOST})


class JobError(Exception):
    """A request that cannot complete; ``code`` is a :class:`common.protocol.ErrorCode`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Lost:
    """Stands for a job attempt that cannot go on (broker lost, frame lost): resubmit.
    ``kind`` names the failover in the metrics."""

    def __init__(self, reason: str, kind: str = "coordinator") -> None:
        self.reason = reason
        self.kind = kind


class _Inbox:
    """The messages of one job attempt, as the reader task delivers them."""

    def __init__(self, deadline: float) -> None:
        self.queue: asyncio.Queue[p.Message | _Lost] = asyncio.Queue()
        self.deadline = deadline  # loop time
        self.seq = 0
        self._held: p.Message | _Lost | None = None

    def put(self, msg: p.Message | _Lost) -> None:
        self.queue.put_nowait(msg)

    async def next(self) -> p.Message | _Lost:
        """The next message. PARTIALs already queued behind it come merged into it (one
        SSE event for what arrived together), and a PARTIAL out of sequence is a loss."""
        msg, self._held = self._held, None
        if msg is None:
            if self.queue.empty():
                async with asyncio.timeout_at(self.deadline):
                    msg = await self.queue.get()
            else:
                msg = self.queue.get_nowait()
        if not isinstance(msg, p.Partial):
            return msg
        if msg.seq != self.seq:
            return _Lost(f"expected PARTIAL {self.seq}, got {msg.seq}", "lost_frame")
        self.seq += 1
        while not self.queue.empty():
            more = self.queue.get_nowait()
            if not (isinstance(more, p.Partial) and more.seq == self.seq):
                self._held = more
                break
            msg.token_ids = msg.token_ids + more.token_ids
            msg.text += more.text
            self.seq += 1
        return msg


class BrokerClient:
    """Submits jobs and control queries to the broker; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.streams: dict[str, _Inbox] = {}
        self.controls: dict[str, asyncio.Future[p.ControlReply]] = {}
        self.heard = 0.0
        self.up = asyncio.Event()
        """Set while the broker answers; requests wait on it (up to the grace period)."""
        self.session = ""
        self.max_epoch = 0
        self.counters: dict[str, int] = {"broker_lost": 0}
        self.failovers: collections.Counter[str] = collections.Counter()
        """Requests resubmitted, by kind: ``mid_stream`` (the worker was lost after output
        reached us, or after the broker's own re-dispatches ran out), ``coordinator`` (the
        broker died, restarted or redirected us) and ``lost_frame`` (a PARTIAL went
        missing). Re-dispatches before the first token happen inside the broker and are
        counted there."""
        self._tasks: list[asyncio.Task[None]] = []
        self._reconnect = False
        self.broker = BrokerChoice(settings.broker_candidates)
        self.monitor: zmq.asyncio.Socket | None = None
        self.connected_at = 0.0
        self.keys = load_keys(settings.home)

    async def start(self) -> None:
        self._connect()
        self._tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._beat())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.sock is not None and self.monitor is not None:
            self._send(p.Disconnect(reason=p.Reason.LEAVING))
            close_watched(self.sock, self.monitor, linger=100)

    def _connect(self) -> None:
        if self.sock is not None and self.monitor is not None:
            close_watched(self.sock, self.monitor)
        self.sock = configure(self.ctx.socket(zmq.DEALER), self.settings, self.keys)
        self.monitor = watch_disconnects(self.sock)
        self.sock.connect(self.broker.current)
        self.poller = zmq.asyncio.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.session = ""  # a new broker's first heartbeat is not a restart
        self.max_epoch = 0  # fencing holds per connection: a restarted lone broker counts
        # from 1 again, and its clients must not ignore it for ever
        self.connected_at = time.monotonic()
        # The same socket, synchronous: drains ready frames without a future per frame.
        self._drain = zmq.Socket.shadow(self.sock.underlying)
        self._send(p.Heartbeat())  # so the broker answers (and we know it) at once

    def _send(self, msg: p.Message) -> None:
        """Send without blocking; with no broker connected the frame is dropped (jobs are
        resubmitted when the broker is back)."""
        assert self.sock is not None
        with contextlib.suppress(zmq.Again):
            self.sock.send_multipart(p.encode(p.GATEWAY, msg), zmq.NOBLOCK)

    async def _await_broker(self, deadline: float) -> None:
        """Wait (up to the grace period, within the deadline) for the broker to answer."""
        if self.up.is_set():
            return
        wait = min(self.settings.grace, deadline - time.monotonic())
        try:
            await asyncio.wait_for(self.up.wait(), max(wait, 0.0))
        except TimeoutError:
            raise JobError(p.ErrorCode.NO_BROKER, (
                f"no broker answers at {', '.join(self.broker.candidates)}; start one with "
                "`mlx-stack up` or `mlx-stack broker`")) from None

    # ----------------------------------------------------------------- background

    async def _reader(self) -> None:
        while True:
            if self._reconnect:
                self._reconnect = False
                self._connect()
            ready = dict(await self.poller.poll(100))
            if self.monitor in ready and disconnected(self.monitor):
                self._advance(f"{self.broker.current} closed the connection")
                continue
            if self.sock not in ready:
                continue
            for _ in range(DRAIN):  # drain without awaiting: one wake-up, many frames
                try:
                    frames = self._drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_frames(frames)

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            _, msg = p.decode(frames, p.FROM_BROKER)
        except p.ProtocolError as exc:
            log_event(log, "frame_dropped", logging.DEBUG, reason=exc)
            return
        if msg.epoch < self.max_epoch:
            return
        self.max_epoch = msg.epoch
        self.heard = time.monotonic()
        self.up.set()
        self._on_message(msg)

    def _on_message(self, msg: p.Message) -> None:
        match msg:
            case p.ControlReply():
                future = self.controls.pop(msg.request_id, None)
                if future is not None and not future.done():
                    future.set_result(msg)
            case p.Heartbeat():
                if msg.session != self.session:
                    if self.session:
                        self._lose_broker("broker restarted")
                    self.session = msg.session
            case p.Disconnect():
                self._lose_broker("broker disconnected")
            case p.Redirect():
                if msg.endpoint != self.broker.current:
                    self.broker.redirect(msg.endpoint)
                    self._move(f"redirected to {msg.endpoint}")
            case p.Accepted() | p.Partial() | p.Final() | p.Fail():
                inbox = self.streams.get(msg.job_id)
                if inbox is not None:
                    inbox.put(msg)

    async def _beat(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            slept = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            # Woken late, this loop itself was stalled (a huge body being parsed, say):
            # the broker's frames wait unread, so its silence is ours. Judge next time.
            stalled = now - slept > 2 * interval
            last_word = max(self.heard, self.connected_at)
            if not stalled and now - last_word > self.settings.peer_timeout:
                self._advance(f"{self.broker.current} silent")
            self._send(p.Heartbeat())

    def _advance(self, reason: str) -> None:
        """The broker in use is gone: try the next candidate."""
        self.broker.advance()
        self._move(reason)

    def _move(self, reason: str) -> None:
        """Use ``self.broker.current`` from now on; open jobs are resubmitted there."""
        if self.up.is_set() or self.streams:
            self._lose_broker(reason)
        self.up.clear()
        self.connected_at = time.monotonic()
        self._reconnect = True  # done by the reader, which owns the socket

    def _lose_broker(self, reason: str) -> None:
        self.up.clear()
        self.counters["broker_lost"] += 1
        log_event(log, "broker_lost", logging.WARNING, reason=reason, open_jobs=len(self.streams))
        for inbox in self.streams.values():
            inbox.put(_Lost(reason))

    # ----------------------------------------------------------------- public

    async def control(self, op: str, args: dict[str, Any] | None = None,
                      timeout: float = 3.0) -> Any:
        """Ask the broker a CONTROL question; its typed answer (common/control.py)."""
        msg = question(op, args)
        request_id = msg.request_id
        future: asyncio.Future[p.ControlReply] = asyncio.get_running_loop().create_future()
        self.controls[request_id] = future
        self._send(msg)
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise JobError(p.ErrorCode.NO_BROKER,
                           f"the broker at {self.broker.current} did not answer "
                           f"within {timeout:g} s; is `mlx-stack broker` running?") from None
        finally:
            self.controls.pop(request_id, None)
        try:
            return answer(op, reply)
        except ControlError as exc:
            raise JobError(p.ErrorCode.INVALID_REQUEST, str(exc)) from None

    async def run(self, model: str, request: p.GenerationRequest) -> AsyncIterator[p.Message]:
        """Run one request to its end, yielding ACCEPTED, PARTIAL... and FINAL messages.

        Resubmits lost jobs with resume tokens (see module docstring); the PARTIALs
        yielded join into one unbroken stream. Raises :class:`JobError` when the request
        cannot complete. Closing the iterator early cancels the job.
        """
        deadline = time.monotonic() + self.settings.request_timeout
        loop_deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
        token_ids: list[int] = []
        text: list[str] = []
        attempts = 0
        while True:
            await self._await_broker(deadline)
            job_id = uuid.uuid4().hex
            inbox = self.streams[job_id] = _Inbox(loop_deadline)
            done = False
            try:
                self._send(p.Submit(
                    job_id=job_id, model=model, request=request.to_dict(),
                    node_id=self.settings.node_id, resume_token_ids=token_ids,
                    resume_text="".join(text), deadline=deadline - time.monotonic(),
                    attempt=attempts))
                while True:
                    try:
                        msg = await inbox.next()
                    except TimeoutError:
                        raise JobError(p.ErrorCode.DEADLINE, (
                            f"the request did not complete within "
                            f"{self.settings.request_timeout:g} s")) from None
                    if isinstance(msg, _Lost):
                        reason, kind = msg.reason, msg.kind
                        break
                    if isinstance(msg, p.Fail):
                        if msg.retryable and msg.code in RESUBMIT_CODES:
                            reason, kind = msg.error, "mid_stream"
                            break
                        done = True
                        raise JobError(msg.code, msg.error)
                    if isinstance(msg, p.Partial):
                        token_ids.extend(msg.token_ids)
                        text.append(msg.text)
                    done = isinstance(msg, p.Final)
                    yield msg
                    if done:
                        return
            finally:
                del self.streams[job_id]
                if not done:
                    self._send(p.Cancel(job_id=job_id))
            attempts += 1
            if attempts > self.settings.max_retries:
                raise JobError(p.ErrorCode.WORKER_LOST,
                               f"gave up after {attempts} attempts; last error: {reason}")
            self.failovers[kind] += 1
            log_event(log, "job_resubmitted", job=job_id, attempt=attempts, kind=kind,
                      resume_tokens=len(token_ids), reason=reason)
