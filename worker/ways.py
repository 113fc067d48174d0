"""A job's way out: straight to the gateway that owns it, or relayed by the broker. One
way per job, chosen when the job starts, and every frame of the job takes it.

Through the broker, every token crosses one more process: one more socket hop and the
broker's wake-ups (0.15-0.2 ms of a first token's time on the 2-vCPU VM where this was
measured, and the broker's CPU for every token). So a SUBMIT names the gateway's stream
endpoint, the broker passes it on in the JOB when this worker can reach it, and the
worker keeps one DEALER per gateway endpoint. The batch loop's thread sends on them
itself, as it makes each frame: handing a token to the I/O thread first cost another
thread wake-up (0.1 ms there).

A job's way is chosen once, when the batch loop starts it (:meth:`Ways.open`), before
its first frame: direct when its JOB names a stream endpoint and the connection to it is
up, or comes up within :data:`CONNECT_WAIT_S` (the first job for a gateway opens the
connection and waits for it); else relayed. Then every frame of the job takes that way,
in order: its ACCEPTED (the job started, and where), its PARTIALs (numbered here, the
one place; a relayed job's PARTIALs that wait together in the outbox leave as one frame,
under the first one's number) and its FINAL. A RELEASE to the broker frees the slot
after the FINAL; a FAIL goes to the broker only, which decides (run it again, or tell
the gateway).

An endpoint whose connection did not come up in time is taken for unreachable (a
firewall, a wrong address) for :data:`UNREACHABLE_S`: its jobs are relayed meanwhile,
without waiting. A direct job whose connection dropped (its monitor says so before each
send, and at every heartbeat: :meth:`Ways.watch`) has lost whatever was in flight: it is
cancelled, and its gateway resumes it from what the client has seen, as for a lost
worker. So is a job that ended lately on it (:data:`common.messages.RELEASED_WATCH_S`):
behind a slow link its last frames, even its first, may still have been queued there.

The broker still hears which direct jobs streamed output (in the I/O thread's next
heartbeat: from then on a job cannot be run again unseen).

Threads: everything here belongs to the batch loop's thread. What the I/O thread needs
goes through the outbox (worker/outbox.py), the one object the two threads share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.config import Settings
from mlx_stack.common.logs import log_event
from mlx_stack.common.meshkeys import MeshKeys
from mlx_stack.common.transport import close_watched, configure, disconnected, watch_disconnects
from mlx_stack.worker.outbox import Outbox

log = logging.getLogger("worker")

MAX_GATEWAYS = 64
"""Gateway endpoints kept connected; beyond, the least recently used idle one is closed."""
IDLE_S = 600.0
"""A connection no job used for this long is closed (its gateway may have restarted on
another port, and ZeroMQ would retry the old one for ever)."""
CONNECT_WAIT_S = 0.5
"""Longest a job waits for the connection to its gateway before it goes through the
broker (the batch waits with it: once per gateway, a new connection is up in
milliseconds)."""
UNREACHABLE_S = 60.0
"""How long an endpoint that did not connect in time is not waited for again."""
RELAYED = ""
BROKEN = "-"
"""The way of a direct job whose connection dropped: its output is dropped until the
cancellation ends it."""
_POLLOUT = int(zmq.POLLOUT)


@dataclass(slots=True)
class Way:
    """One running job's way out."""

    endpoint: str
    """The gateway endpoint it streams to, :data:`RELAYED` or :data:`BROKEN`."""
    parts: int = 0
    """PARTIALs sent: the next one's ``seq``, the FINAL's ``parts``."""
    streamed: bool = False
    """Whether its output began (direct jobs: told to the broker once)."""


class Ways:
    """The worker's DEALERs to gateways and each running job's way (module docstring).
    ``where`` is this worker as its ACCEPTEDs name it; ``cancel`` stops a job whose
    connection dropped. ``count`` counts ``jobs_direct``, ``jobs_relayed`` and
    ``streams_lost`` in the worker's heartbeat counters."""

    def __init__(self, settings: Settings, keys: MeshKeys | None, ctx: zmq.Context,
                 outbox: Outbox, where: msgs.Accepted, cancel: Callable[[str], None],
                 count: Callable[[str], None]) -> None:
        self.settings = settings
        self.keys = keys
        self.ctx = ctx
        self.outbox = outbox
        self.where = where
        self.cancel = cancel
        self.count = count
        self.sockets: dict[str, tuple[zmq.Socket, zmq.Socket]] = {}
        """Gateway endpoint -> (DEALER, its disconnect monitor), least recently used first."""
        self.used: dict[str, float] = {}
        """Gateway endpoint -> when a job last went there (monotonic seconds)."""
        self.unreachable: dict[str, float] = {}
        """Gateway endpoint -> until when it is not waited for (monotonic seconds)."""
        self.jobs: dict[str, Way] = {}
        """Running job (dispatch id) -> its way."""
        self.ended: dict[str, tuple[str, float]] = {}
        """A direct job released lately (dispatch id) -> (its endpoint, until when it is
        remembered): its last frames may be lost with its connection (see :meth:`_break`).
        In the order they ended."""
        self.last_ended: dict[str, float] = {}
        """Gateway endpoint -> until when the last job that ended there is remembered: the
        connections :meth:`watch` looks at beside those of running jobs."""

    def open(self, job: msgs.Job) -> None:
        """Choose ``job``'s way and send its ACCEPTED by it: the engine took the job."""
        endpoint = self._connected(job.reply_to) if job.reply_to.startswith("tcp://") else ""
        self.jobs[job.job_id] = Way(endpoint)
        self.count("jobs_direct" if endpoint else "jobs_relayed")
        self.send(msgs.Accepted(job_id=job.job_id, epoch=job.epoch, node_id=self.where.node_id,
                                worker_id=self.where.worker_id, model_id=self.where.model_id))

    def send(self, msg: msgs.Message) -> None:
        """Send one of a job's messages its way: ACCEPTED, PARTIAL (numbered here) and
        FINAL by the job's way, then a RELEASE to the broker; a FAIL to the broker."""
        if isinstance(msg, msgs.Fail):  # maybe before its way opened (a refusal)
            self.jobs.pop(msg.job_id, None)
            self.outbox.put(msg)
            return
        way = self.jobs[msg.job_id]
        if isinstance(msg, msgs.Partial):
            msg.seq = way.parts
        elif isinstance(msg, msgs.Final):
            msg.parts = way.parts
        if way.endpoint == RELAYED:
            if not self.outbox.put(msg) and isinstance(msg, msgs.Partial):
                way.parts += 1  # else it joined the one waiting before it
        elif way.endpoint != BROKEN:
            self._check(way.endpoint)
            if way.endpoint != BROKEN and not self._direct(way.endpoint, msg):
                self._break(way.endpoint)
            elif isinstance(msg, msgs.Partial):
                way.parts += 1
                if not way.streamed:
                    way.streamed = True
                    self.outbox.streamed(msg.job_id)
        if isinstance(msg, msgs.Final):
            del self.jobs[msg.job_id]
            if way.endpoint not in (RELAYED, BROKEN):
                until = time.monotonic() + msgs.RELEASED_WATCH_S
                self.ended[msg.job_id] = (way.endpoint, until)
                self.last_ended[way.endpoint] = until
            # A broken job's output did not all arrive: a FINAL would end its stream
            # short. A retryable FAIL has the gateway resume it from what it has.
            self.outbox.put(released(msg) if way.endpoint != BROKEN else msgs.Fail(
                job_id=msg.job_id, epoch=msg.epoch, error="the stream to the gateway was lost",
                code=msgs.ErrorCode.CANCELLED, retryable=True))

    def watch(self) -> None:
        """Look at the connections that jobs stream over or ended on lately (at every
        heartbeat): a drop is found without waiting for a send on it, which may never
        come (every job there ended, its output still queued behind a slow link)."""
        now = time.monotonic()
        while self.ended:  # in the order they ended, so the expired ones come first
            job, (_, until) = next(iter(self.ended.items()))
            if until > now:
                break
            del self.ended[job]
        self.last_ended = {e: until for e, until in self.last_ended.items() if until > now}
        watched = {way.endpoint for way in self.jobs.values()} | self.last_ended.keys()
        for endpoint in watched & self.sockets.keys():
            self._check(endpoint)

    def close(self) -> None:
        for endpoint in list(self.sockets):
            self._close(endpoint)

    def _connected(self, endpoint: str) -> str:
        """``endpoint`` once its connection is up (opened, and waited for, if need be);
        :data:`RELAYED` when it does not come up in time."""
        now = time.monotonic()
        if self.unreachable.get(endpoint, 0.0) > now:
            return RELAYED
        self.used[endpoint] = now
        if endpoint in self.sockets:
            self.sockets[endpoint] = self.sockets.pop(endpoint)  # most recently used
            self._check(endpoint)
        else:
            self._evict(now)
            sock = configure(self.ctx.socket(zmq.DEALER), self.settings, self.keys)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # writable only once connected
            monitor = watch_disconnects(sock)
            sock.connect(endpoint)
            self.sockets[endpoint] = (sock, monitor)
        sock = self.sockets[endpoint][0]
        if sock.getsockopt(zmq.EVENTS) & _POLLOUT or sock.poll(CONNECT_WAIT_S * 1000,
                                                                zmq.POLLOUT):
            return endpoint
        self.unreachable[endpoint] = now + UNREACHABLE_S
        log_event(log, "gateway_unreachable", logging.WARNING, gateway=endpoint,
                  waited_s=CONNECT_WAIT_S, fix="its jobs go through the broker meanwhile; "
                  "check that this node reaches the gateway's stream_port (firewall, "
                  "broker_advertise)")
        return RELAYED

    def _check(self, endpoint: str) -> None:
        """Break the jobs on ``endpoint``'s connection if its monitor says it dropped
        since the last look."""
        if disconnected(self.sockets[endpoint][1]):  # every send looks
            self._break(endpoint)

    def _break(self, endpoint: str) -> None:
        """Mark every job streaming to ``endpoint`` broken, and cancel it. A job released
        lately on that connection may have lost its last frames with it: its FAIL has the
        broker (which remembers released jobs as long) tell the gateway, which resumes the
        job unless its FINAL did arrive (or it resumed it already: it watches the
        connection too)."""
        broken = [job for job, way in self.jobs.items() if way.endpoint == endpoint]
        for job in broken:
            self.jobs[job].endpoint = BROKEN
            self.count("streams_lost")
            self.cancel(job)
        for job in [j for j, (e, _) in self.ended.items() if e == endpoint]:
            del self.ended[job]
            self.outbox.put(msgs.Fail(job_id=job, error="the stream to the gateway was lost",
                                      code=msgs.ErrorCode.CANCELLED, retryable=True))
        if broken:
            log_event(log, "stream_lost", logging.INFO, jobs=len(broken), gateway=endpoint)

    def _direct(self, endpoint: str, msg: msgs.Message) -> bool:
        """Send ``msg`` on the connection to ``endpoint``; False if it is not up."""
        try:
            self.sockets[endpoint][0].send_multipart(wire.encode(wire.WORKER, msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _evict(self, now: float) -> None:
        """Close idle connections: those unused for :data:`IDLE_S`, and the least recently
        used while there are :data:`MAX_GATEWAYS`."""
        # A connection that jobs ended on lately may still carry their output.
        busy = {way.endpoint for way in self.jobs.values()} | {
            endpoint for endpoint, until in self.last_ended.items() if until > now}
        for endpoint in list(self.sockets):
            if endpoint not in busy and (len(self.sockets) >= MAX_GATEWAYS
                                         or now - self.used[endpoint] > IDLE_S):
                self._close(endpoint)

    def _close(self, endpoint: str) -> None:
        sock, monitor = self.sockets.pop(endpoint)
        del self.used[endpoint]
        close_watched(sock, monitor)


def released(final: msgs.Final) -> msgs.Release:
    """The RELEASE after ``final``: what the prompt cache served of the job's prompt and
    what the engine prefilled, for the broker's guess of what the cache holds."""
    return msgs.Release(job_id=final.job_id, epoch=final.epoch,
                        prompt_tokens_reused=final.usage.get("cached_tokens", 0),
                        prompt_tokens_computed=final.usage.get("prompt_tokens_computed", 0))
