"""A job's way out: straight to the gateway that owns it, or relayed by the broker.

Through the broker, every token crosses one more process: two more socket hops and a
thread wake-up, about half a millisecond of a first token's time on a small Mac. So a
SUBMIT names the gateway's stream endpoint, the broker passes it on in the JOB when this
worker can reach it, and the worker keeps one DEALER per gateway endpoint.

The broker still hears what it must: which jobs streamed output (in the next heartbeat:
from then on a job cannot be run again unseen), every FINAL (the slot is free;
forwarded, it also tells the gateway how many PARTIALs to wait for) and every FAIL
(only there).

A job's way is chosen at its first message and kept, so that its frames stay in order:
direct when the socket to its gateway is connected (``ZMQ_IMMEDIATE``: a send with no
connection fails at once rather than queue), else relayed. A direct job whose connection
drops has lost whatever was in flight: it is cancelled, and its gateway resumes it from
what the client has seen, as for a lost worker.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import zmq

from common import protocol as p
from common.config import Settings
from common.logs import log_event
from common.meshkeys import MeshKeys
from common.transport import close_watched, configure, disconnected, watch_disconnects

log = logging.getLogger("worker")

MAX_GATEWAYS = 64
"""Gateway endpoints kept connected; beyond, the least recently used idle one is closed."""
IDLE_S = 600.0
"""A connection no job used for this long is closed (its gateway may have restarted on
another port, and ZeroMQ would retry the old one for ever)."""
RELAYED = ""
BROKEN = "-"
"""The way of a direct job whose connection failed: its output is dropped until the
cancellation ends it."""


class Streams:
    """The worker's DEALERs to gateways and each running job's way (module docstring).
    Used by the worker's I/O thread only; ``poller`` is its poller, which learns of
    each connection's disconnect monitor."""

    def __init__(self, settings: Settings, keys: MeshKeys | None, ctx: zmq.Context,
                 poller: zmq.Poller) -> None:
        self.settings = settings
        self.keys = keys
        self.ctx = ctx
        self.poller = poller
        self.sockets: dict[str, tuple[zmq.Socket, zmq.Socket]] = {}
        """Gateway endpoint -> (DEALER, its disconnect monitor), least recently used first."""
        self.used: dict[str, float] = {}
        """Gateway endpoint -> when a JOB last named it (monotonic seconds)."""
        self.reply_to: dict[str, str] = {}
        """Job -> the stream endpoint its JOB named (none: relayed)."""
        self.ways: dict[str, str] = {}
        """Job -> the endpoint it streams to, :data:`RELAYED` or :data:`BROKEN`."""
        self.announced: set[str] = set()
        """Direct jobs whose output began: told to the broker (:meth:`streamed`), or to be."""
        self._unannounced: list[str] = []
        self.counters: collections.Counter[str] = collections.Counter()
        """Jobs by way: ``jobs_direct``, ``jobs_relayed``; ``streams_lost``: direct jobs
        whose connection failed (reported in the worker's heartbeats)."""

    def start(self, job: p.Job) -> None:
        """A JOB arrived: connect to its gateway now (the handshake runs during the
        prefill), so that the job's first message can go direct."""
        if not job.reply_to.startswith("tcp://"):
            return
        self.reply_to[job.job_id] = job.reply_to
        now = time.monotonic()
        self.used[job.reply_to] = now
        if job.reply_to in self.sockets:
            self.sockets[job.reply_to] = self.sockets.pop(job.reply_to)  # most recent
            return
        self._evict(now)
        sock = configure(self.ctx.socket(zmq.DEALER), self.settings, self.keys)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        monitor = watch_disconnects(sock)
        sock.connect(job.reply_to)
        self.poller.register(monitor, zmq.POLLIN)
        self.sockets[job.reply_to] = (sock, monitor)

    def send(self, msg: p.Partial | p.Final | p.Fail,
             broker: Callable[[p.Message], object]) -> bool:
        """Send one of a job's messages its way (``broker`` sends to the broker); False
        when its direct way just failed: cancel the job."""
        job_id = msg.job_id
        if isinstance(msg, p.Fail):
            self._end(job_id)
            broker(msg)
            return True
        way = self.ways.get(job_id)
        if way is None:  # the job's first message: direct if connected, else relayed
            way = self.reply_to.get(job_id, RELAYED)
            if way != RELAYED and not self._direct(way, msg):
                way = RELAYED
            self.ways[job_id] = way
            self.counters["jobs_relayed" if way == RELAYED else "jobs_direct"] += 1
            sent = way != RELAYED
        elif way in (RELAYED, BROKEN):
            sent = False
        elif not (sent := self._direct(way, msg)):
            self.ways[job_id] = BROKEN
            self.counters["streams_lost"] += 1
            log_event(log, "stream_lost", logging.INFO, job=job_id, gateway=way)
        if isinstance(msg, p.Final):
            self._end(job_id)
            broker(msg)
        elif way == RELAYED:
            broker(msg)
        elif sent and job_id not in self.announced and msg.has_output:
            self.announced.add(job_id)
            self._unannounced.append(job_id)
        return sent or way in (RELAYED, BROKEN)

    def streamed(self) -> list[str]:
        """The direct jobs whose output began since the last call (for the heartbeat)."""
        jobs, self._unannounced = self._unannounced, []
        return jobs

    def lost(self, ready: dict) -> list[str]:
        """The direct jobs whose connection dropped (``ready`` is what the poller
        returned): frames may have been lost, so they are to be cancelled."""
        dropped = [endpoint for endpoint, (_, monitor) in self.sockets.items()
                   if ready.get(monitor) and disconnected(monitor)]
        jobs = [job for job, way in self.ways.items() if way in dropped]
        for job in jobs:
            self.ways[job] = BROKEN
        self.counters["streams_lost"] += len(jobs)
        return jobs

    def close(self) -> None:
        for endpoint in list(self.sockets):
            self._close(endpoint)

    def _direct(self, endpoint: str, msg: p.Message) -> bool:
        try:
            self.sockets[endpoint][0].send_multipart(p.encode(p.WORKER, msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _end(self, job_id: str) -> None:
        self.reply_to.pop(job_id, None)
        self.ways.pop(job_id, None)
        self.announced.discard(job_id)

    def _evict(self, now: float) -> None:
        """Close idle connections: those unused for :data:`IDLE_S`, and the least recently
        used while there are :data:`MAX_GATEWAYS`."""
        busy = set(self.reply_to.values())
        for endpoint in list(self.sockets):
            if endpoint not in busy and (len(self.sockets) >= MAX_GATEWAYS
                                         or now - self.used[endpoint] > IDLE_S):
                self._close(endpoint)

    def _close(self, endpoint: str) -> None:
        sock, monitor = self.sockets.pop(endpoint)
        del self.used[endpoint]
        self.poller.unregister(monitor)
        close_watched(sock, monitor)
