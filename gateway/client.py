"""The gateway's side of the broker protocol: the Paranoid Pirate link (common/brokerlink.py)
and a client that owns each request.

One DEALER socket per gateway process, owned by one reader task that waits for it to be
readable, then receives without blocking, and that alone replaces the socket when the
broker falls silent. Replies are routed by job id to per-job inboxes and by request id
to CONTROL futures. The sockets are watched by the event loop's own descriptor callbacks
(gateway/fdwatch.py says what that buys and costs).

Workers send a job's frames straight to the gateway's stream socket when they can
reach it (gateway/streams.py), else through the broker: one way per dispatch, so they
come in order; the inbox (gateway/inbox.py) checks them.

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
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.brokerlink import BrokerLink
from mlx_stack.common.config import Settings
from mlx_stack.common.control import ControlError, answer, question
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.common.logs import log_event
from mlx_stack.common.meshkeys import load_keys
from mlx_stack.gateway.attempts import REDISPATCHED, Attempts, JobError, JobEvent, Resubmit
from mlx_stack.gateway.fdwatch import FdWatch
from mlx_stack.gateway.inbox import Inbox, Lost
from mlx_stack.gateway.prefix import prefix_of
from mlx_stack.gateway.streams import StreamSocket

log = logging.getLogger("gateway")


class BrokerClient:
    """Submits jobs and control queries to the broker; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = load_keys(settings.home)
        self.link = BrokerLink(settings, wire.GATEWAY, self.keys, msgs.Heartbeat)
        self.stream_socket: StreamSocket | None = None
        """Where workers stream output to this gateway (bound by :meth:`start`)."""
        self.streams: dict[str, Inbox] = {}
        self.controls: dict[str, asyncio.Future[msgs.ControlReply]] = {}
        self.up = asyncio.Event()
        """Set while the broker answers; requests wait on it (up to the grace period)."""
        self.counters: dict[str, int] = {"broker_lost": 0}
        self.failovers: collections.Counter[str] = collections.Counter()
        """Requests resubmitted, by kind: ``mid_stream`` (the worker was lost after output
        reached us, or after the broker's own re-dispatches ran out), ``coordinator`` (the
        broker died, restarted or redirected us) and ``lost_frame`` (a PARTIAL went
        missing). Re-dispatches before the first token happen inside the broker; they are
        counted here (``pre_token``) when a later dispatch's ACCEPTED comes, so a new
        coordinator does not reset them."""
        self._tasks: list[asyncio.Task[None]] = []
        self._move_to: tuple[str, str] | None = None
        """(reason, endpoint or "") of a move to another broker, for the reader to make."""
        self.fds = FdWatch()
        self._watched: list[int] = []
        """The link's descriptors (its socket's and its monitor's)."""

    async def start(self) -> None:
        self.stream_socket = StreamSocket(self.settings, self.keys, self.link.ctx)
        self.fds.watch(self.stream_socket.sock, self._read_streams)
        self._connect()
        self._tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._beat())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.link.sock is not None:
            self._unwatch()
            self.link.send(msgs.Disconnect(reason=msgs.Reason.LEAVING))
            self.link.close()
        if self.stream_socket is not None:
            self.fds.unwatch(self.stream_socket.sock.FD)
            self.stream_socket.close()

    def _connect(self, reason: str = "", to: str = "") -> None:
        """Open the link (first call) or move it; the event loop watches the new one."""
        self._unwatch()  # before the old socket closes: its descriptor may be reused
        if self.link.sock is None:
            self.link.connect()
        else:
            self.link.reconnect(reason, to)
        assert self.link.sock is not None and self.link.monitor is not None
        self._watched = [self.fds.watch(self.link.sock, self._read_link),
                         self.fds.watch(self.link.monitor)]
        self.fds.wake()  # the hello may already have been answered

    def _unwatch(self) -> None:
        for fd in self._watched:
            self.fds.unwatch(fd)
        self._watched = []

    def _send(self, msg: msgs.Message) -> None:
        """Send on the link (and poke the reader: gateway/fdwatch.py)."""
        self.link.send(msg)
        self.fds.poke(self.link.sock)

    def _reply_to(self) -> str:
        return self.stream_socket.endpoint if self.stream_socket is not None else ""

    async def _await_broker(self, deadline: float) -> None:
        """Wait (up to the grace period, within the deadline) for the broker to answer."""
        if self.up.is_set():
            return
        wait = min(self.settings.grace, deadline - time.monotonic())
        try:
            await asyncio.wait_for(self.up.wait(), max(wait, 0.0))
        except TimeoutError:
            raise JobError(msgs.ErrorCode.NO_BROKER, (
                f"no broker answers at {', '.join(self.link.broker.candidates)}; start one "
                "with `mlx-stack up` or `mlx-stack broker`")) from None

    # ----------------------------------------------------------------- background

    async def _reader(self) -> None:
        """The one task that reads the link and moves it (it owns the socket)."""
        while True:
            if self._move_to is not None:
                (reason, to), self._move_to = self._move_to, None
                self._connect(reason, to)
            await self.fds.wait(self.link.sock, self.link.monitor,
                                self.stream_socket and self.stream_socket.sock)
            if self.link.closed():
                self._move(f"{self.link.endpoint} closed or refused the connection")
                continue
            self._deliver()

    def _deliver(self) -> None:
        """Read what waits on the link, then on the stream socket (the reader's round)."""
        self._read_link()
        self._read_streams()

    def _read_link(self) -> None:
        """Deliver what waits on the link (also its descriptor's callback). When more
        waits than one read takes, the reader comes back for it after a turn of the loop."""
        for msg in self.link.receive():
            if self._move_to is None and not isinstance(msg, msgs.Redirect | msgs.Disconnect):
                # A broker that sends us away is not up for us: jobs woken now
                # would be submitted to it and lost, unseen by the move after.
                self.up.set()
            self._on_message(msg)
        self.fds.poke(self.link.sock)

    def _read_streams(self) -> None:
        """Deliver what workers sent straight here (the stream socket's descriptor
        callback): a token wakes this alone, not the link's checks too."""
        assert self.stream_socket is not None
        for msg in self.stream_socket.receive():
            self._on_message(msg)
        self.fds.poke(self.stream_socket.sock)

    def _on_message(self, msg: msgs.Message) -> None:
        match msg:
            case msgs.ControlReply():
                future = self.controls.pop(msg.request_id, None)
                if future is not None and not future.done():
                    future.set_result(msg)
            case msgs.Heartbeat():
                if self.link.restarted(msg):
                    self._lose_broker("broker restarted")
            case msgs.Disconnect():
                self._lose_broker(f"broker disconnected ({msg.reason or 'no reason'})")
            case msgs.Redirect():
                if msg.endpoint != self.link.endpoint:
                    self._move(f"redirected to {msg.endpoint}", to=msg.endpoint)
            case msgs.Accepted() | msgs.Partial() | msgs.Final() | msgs.Fail():
                # A worker's messages name the dispatch, <job id>/<n>.
                inbox = self.streams.get(msg.job_id.partition("/")[0])
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
            if not stalled and self._move_to is None and self.link.silent(now):
                self._move(f"{self.link.endpoint} silent")
            self._send(msgs.Heartbeat())

    def _move(self, reason: str, to: str = "") -> None:
        """Leave the broker in use (for ``to``, else the next candidate); open jobs are
        resubmitted to the next one. The reader makes the move: it owns the socket."""
        if self.up.is_set() or self.streams:
            self._lose_broker(reason)
        self.up.clear()
        self._move_to = (reason, to)

    def _lose_broker(self, reason: str) -> None:
        self.up.clear()
        self.counters["broker_lost"] += 1
        log_event(log, "broker_lost", logging.WARNING, reason=reason, open_jobs=len(self.streams))
        for inbox in self.streams.values():
            inbox.put(Lost(reason))

    # ----------------------------------------------------------------- public

    async def control(self, op: str, args: dict[str, Any] | None = None,
                      timeout: float = 3.0) -> Any:
        """Ask the broker a CONTROL question; its typed answer (common/control.py)."""
        msg = question(op, args)
        request_id = msg.request_id
        future: asyncio.Future[msgs.ControlReply] = asyncio.get_running_loop().create_future()
        self.controls[request_id] = future
        self._send(msg)
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise JobError(msgs.ErrorCode.NO_BROKER,
                           f"the broker at {self.link.endpoint} did not answer "
                           f"within {timeout:g} s; is `mlx-stack broker` running?") from None
        finally:
            self.controls.pop(request_id, None)
        try:
            return answer(op, reply)
        except ControlError as exc:
            raise JobError(msgs.ErrorCode.INVALID_REQUEST, str(exc)) from None

    async def run(self, model: str, request: GenerationRequest,
                  request_id: str) -> AsyncIterator[JobEvent]:
        """Run one request to its end: its job stream (gateway/attempts.py), one
        :class:`~gateway.attempts.Served` once a worker started it, the
        :class:`~gateway.attempts.Piece` s of output and one
        :class:`~gateway.attempts.Done`.

        Resubmits lost jobs with resume tokens (see module docstring); the pieces join
        into one unbroken stream whichever workers made them. Raises :class:`JobError`
        when the request cannot complete. Closing the iterator early cancels the job.
        ``request_id`` names the request in every process's logs and route records.
        """
        deadline = time.monotonic() + self.settings.request_timeout
        loop_deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
        attempts = Attempts(self.settings.max_retries)
        prefix = prefix_of(request)  # where its prompt cache is: the same every attempt
        while True:
            await self._await_broker(deadline)
            job_id = secrets.token_hex(16)
            inbox = self.streams[job_id] = Inbox(loop_deadline)
            log_event(log, "job_submitted", logging.DEBUG, request=request_id, job=job_id,
                      model=model, attempt=attempts.submitted)
            try:
                self._send(msgs.Submit(
                    job_id=job_id, request_id=request_id, model=model, request=request,
                    node_id=self.settings.node_id, deadline=deadline - time.monotonic(),
                    reply_to=self._reply_to(), prefix_hashes=prefix.hashes,
                    prefix_ends=prefix.ends, **attempts.submission()))
                resubmit = None
                while resubmit is None:
                    try:
                        msg = await inbox.next()
                    except TimeoutError:
                        raise JobError(msgs.ErrorCode.DEADLINE, (
                            f"the request did not complete within "
                            f"{self.settings.request_timeout:g} s")) from None
                    for step in attempts.apply(msg):
                        if isinstance(step, Resubmit):
                            resubmit = step
                        elif step == REDISPATCHED:
                            self.failovers["pre_token"] += 1
                        elif step is not None:
                            yield step
                    if attempts.ended:
                        return
            finally:
                self.streams.pop(job_id).close()
                if not attempts.ended:
                    self._send(msgs.Cancel(job_id=job_id))
            attempts.resubmit(resubmit)
            self.failovers[resubmit.kind] += 1
            log_event(log, "job_resubmitted", request=request_id,
                      attempt=attempts.submitted, kind=resubmit.kind,
                      resume_tokens=len(attempts.token_ids), reason=resubmit.reason)
