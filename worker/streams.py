"""A job's way out: straight to the gateway that owns it, or relayed by the broker.

Through the broker, every token crosses one more process: one more socket hop and the
broker's wake-ups (0.15-0.2 ms of a first token's time on the 2-vCPU VM where this was
measured, and the broker's CPU for every token). So a SUBMIT names the gateway's stream
endpoint, the broker passes it on in the JOB when this worker can reach it, and the
worker keeps one DEALER per gateway endpoint. The batch loop's thread sends on them
itself, as it makes each PARTIAL: handing a token to the I/O thread first cost another
thread wake-up (0.1 ms there).

The broker still hears what it must: which jobs streamed output (in the I/O thread's
next heartbeat: from then on a job cannot be run again unseen), every FINAL (the slot is
free; forwarded, it also tells the gateway how many PARTIALs to wait for) and every FAIL
(only there). Those go through the worker's outbox, as everything of a relayed job does.

A job's way is chosen at its first message and kept, so that its frames stay in order:
direct when the socket to its gateway is connected (``ZMQ_IMMEDIATE``: a send with no
connection fails at once rather than queue), else relayed; the first job for a gateway
opens the connection, so it is relayed. A direct job whose connection failed or dropped
(its monitor says so before each send) has lost whatever was in flight: it is
cancelled, and its gateway resumes it from what the client has seen, as for a lost
worker.

Threads: the sockets and the jobs' ways belong to the batch loop's thread. The I/O
thread only names a job's gateway before handing the job over (:meth:`Streams.expect`)
and takes the list for its heartbeat (:meth:`Streams.streamed`, under a lock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq

from common import messages as msgs
from common import wire
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
    ``count`` counts ``jobs_direct``, ``jobs_relayed`` and ``streams_lost`` (direct jobs
    whose connection failed) in the worker's heartbeat counters."""

    def __init__(self, settings: Settings, keys: MeshKeys | None, ctx: zmq.Context,
                 count: Callable[[str], None]) -> None:
        self.settings = settings
        self.keys = keys
        self.ctx = ctx
        self.count = count
        self.sockets: dict[str, tuple[zmq.Socket, zmq.Socket]] = {}
        """Gateway endpoint -> (DEALER, its disconnect monitor), least recently used first."""
        self.used: dict[str, float] = {}
        """Gateway endpoint -> when a job last went there (monotonic seconds)."""
        self.reply_to: dict[str, str] = {}
        """Job -> the stream endpoint its JOB named (set by the I/O thread)."""
        self.ways: dict[str, str] = {}
        """Job -> the endpoint it streams to, :data:`RELAYED` or :data:`BROKEN`."""
        self.seq: dict[str, int] = {}
        """Direct job -> PARTIALs sent (numbered here; the outbox numbers relayed ones)."""
        self.announced: set[str] = set()
        """Direct jobs whose output began."""
        self._unannounced: list[str] = []
        self._lock = threading.Lock()

    def expect(self, job: msgs.Job) -> None:
        """I/O thread, before the job goes to the batch loop: where its output may go."""
        if job.reply_to.startswith("tcp://"):
            self.reply_to[job.job_id] = job.reply_to

    def streamed(self) -> list[str]:
        """I/O thread: the direct jobs whose output began since the last call (for the
        heartbeat)."""
        with self._lock:
            jobs, self._unannounced = self._unannounced, []
        return jobs

    def send(self, msg: msgs.Partial | msgs.Final | msgs.Fail,
             relay: Callable[[msgs.Message], object]) -> list[str]:
        """Send one of a job's messages its way (``relay`` hands it to the I/O thread for
        the broker). Returns the jobs to cancel: those on a direct connection that failed
        or dropped (even one that came back: what was in flight is lost)."""
        job_id = msg.job_id
        if isinstance(msg, msgs.Fail):
            self._end(job_id)
            relay(msg)
            return []
        way = self.ways.get(job_id)
        endpoint = self.reply_to.get(job_id, RELAYED) if way is None else way
        broken = self._check(endpoint)
        way = self.ways.get(job_id)
        if isinstance(msg, msgs.Final):  # how many PARTIALs the gateway must have first
            msg.parts = self.seq.get(job_id, msg.parts)
        if way is None:  # the job's first message: direct if connected, else relayed
            way = self._open(endpoint)
            if way != RELAYED:
                self.seq[job_id] = 0
                if not self._direct(way, msg):
                    way = RELAYED
                    del self.seq[job_id]
            self.ways[job_id] = way
            self.count("jobs_relayed" if way == RELAYED else "jobs_direct")
            sent = way != RELAYED
        elif way in (RELAYED, BROKEN):
            sent = False
        elif not (sent := self._direct(way, msg)):
            broken += self._break(way)
            way = BROKEN
        if isinstance(msg, msgs.Final):
            self._end(job_id)
            # A broken job's output did not all arrive: a FINAL would end its stream
            # short. A retryable FAIL has the gateway resume it from what it has.
            relay(msg if way != BROKEN else msgs.Fail(
                job_id=job_id, epoch=msg.epoch, error="the stream to the gateway was lost",
                code=msgs.ErrorCode.CANCELLED, retryable=True))
        elif way == RELAYED:
            relay(msg)
        elif sent and job_id not in self.announced and msg.has_output:
            self.announced.add(job_id)
            with self._lock:
                self._unannounced.append(job_id)
        return broken

    def close(self) -> None:
        for endpoint in list(self.sockets):
            self._close(endpoint)

    def _open(self, endpoint: str) -> str:
        """The way for a new job to ``endpoint``: itself once a socket to it exists (it
        may still be connecting), else :data:`RELAYED` after opening one."""
        if endpoint == RELAYED:
            return RELAYED
        now = time.monotonic()
        self.used[endpoint] = now
        if endpoint in self.sockets:
            self.sockets[endpoint] = self.sockets.pop(endpoint)  # most recently used
            return endpoint
        self._evict(now)
        sock = configure(self.ctx.socket(zmq.DEALER), self.settings, self.keys)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        monitor = watch_disconnects(sock)
        sock.connect(endpoint)
        self.sockets[endpoint] = (sock, monitor)
        return RELAYED

    def _check(self, endpoint: str) -> list[str]:
        """The jobs on ``endpoint``'s connection if its monitor says it dropped since the
        last look (they are broken now), else none."""
        if endpoint not in self.sockets:
            return []
        if not disconnected(self.sockets[endpoint][1]):  # every send looks
            return []
        return self._break(endpoint)

    def _break(self, endpoint: str) -> list[str]:
        """Mark every job streaming to ``endpoint`` broken, and return them."""
        broken = [job for job, way in self.ways.items() if way == endpoint]
        for job in broken:
            self.ways[job] = BROKEN
            self.count("streams_lost")
        if broken:
            log_event(log, "stream_lost", logging.INFO, jobs=len(broken), gateway=endpoint)
        return broken

    def _direct(self, endpoint: str, msg: msgs.Partial | msgs.Final) -> bool:
        """Send ``msg`` on the connection to ``endpoint``, numbered if a PARTIAL; False if
        the connection is not up."""
        sock, _ = self.sockets[endpoint]
        if isinstance(msg, msgs.Partial):
            msg.seq = self.seq[msg.job_id]
        try:
            sock.send_multipart(wire.encode(wire.WORKER, msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        if isinstance(msg, msgs.Partial):
            self.seq[msg.job_id] += 1
        return True

    def _end(self, job_id: str) -> None:
        self.reply_to.pop(job_id, None)
        self.ways.pop(job_id, None)
        self.seq.pop(job_id, None)
        self.announced.discard(job_id)

    def _evict(self, now: float) -> None:
        """Close idle connections: those unused for :data:`IDLE_S`, and the least recently
        used while there are :data:`MAX_GATEWAYS`."""
        busy = set(self.reply_to.values())  # one C call: the I/O thread waits for the GIL
        for endpoint in list(self.sockets):
            if endpoint not in busy and (len(self.sockets) >= MAX_GATEWAYS
                                         or now - self.used[endpoint] > IDLE_S):
                self._close(endpoint)

    def _close(self, endpoint: str) -> None:
        sock, monitor = self.sockets.pop(endpoint)
        del self.used[endpoint]
        close_watched(sock, monitor)
