"""The worker process: a DEALER to the broker on the main thread, the engine beside it.

The zguide's Paranoid Pirate worker, with one change: inference runs in one batch loop
thread (:mod:`worker.batch`), never on the I/O thread, so heartbeats keep flowing during a
long prefill and a busy worker is as alive (or as dead) to the broker as an idle one.

    main thread:  poll DEALER + outbox; JOB and CANCEL -> batch loop;
                  outbox messages (merged PARTIALs, FINAL) -> broker; heartbeat;
                  reconnect on silence
    batch loop:   every running job decoded together; PARTIAL/FINAL into the outbox
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import psutil
import zmq

from common import protocol as p
from common.config import Settings
from common.logs import log_event
from common.meshkeys import load_keys
from common.transport import BrokerChoice, close_watched, configure, disconnected, watch_disconnects
from worker.batch import BatchLoop
from worker.engine import Engine
from worker.outbox import Outbox

log = logging.getLogger("worker")

MAX_BACKOFF = 8.0
STOP_TIMEOUT = 5.0
DRAIN = 1000
"""Messages handled per wake-up and socket, so heartbeats go out under any load."""


def system_memory() -> tuple[int, int]:
    """This machine's (total, available) memory in bytes."""
    mem = psutil.virtual_memory()
    return mem.total, mem.available


class Worker:
    """Registers ``engine`` with the broker and serves its jobs until :meth:`stop`."""

    def __init__(self, engine: Engine, settings: Settings, aliases: list[str],
                 memory: Callable[[], tuple[int, int]] | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.engine = engine
        self.memory = memory or system_memory
        """(total, free) bytes as reported to the broker; the synthetic engine may fake it."""
        self.settings = settings
        self.aliases = aliases
        self.ctx = ctx or zmq.Context.instance()
        self.worker_id = f"{settings.node_id}-{engine.model_id}-{uuid.uuid4().hex[:6]}"
        self.running: set[str] = set()
        """Jobs handed to the batch loop whose FINAL or FAIL has not been sent yet."""
        self.counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()
        self.max_epoch = 0
        self.outbox = Outbox()
        self.batch = BatchLoop(engine, self.outbox.put, self._count)
        self._stopping = threading.Event()
        self.dealer: zmq.Socket | None = None
        self.broker = BrokerChoice(settings.broker_candidates)
        self.monitor: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self.keys = load_keys(settings.home)

    def _count(self, key: str, n: int = 1) -> None:
        with self._counters_lock:
            self.counters[key] += n

    # ----------------------------------------------------------------- I/O side

    def _connect(self) -> None:
        if self.dealer is not None and self.monitor is not None:
            self.poller.unregister(self.dealer)
            self.poller.unregister(self.monitor)
            close_watched(self.dealer, self.monitor)
        self.dealer = configure(self.ctx.socket(zmq.DEALER), self.settings, self.keys)
        self.monitor = watch_disconnects(self.dealer)
        self.dealer.connect(self.broker.current)
        self.max_epoch = 0  # fencing holds per connection (see gateway/client.py)
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self._send(self._ready())

    def _ready(self) -> p.Ready:
        total, free = self.memory()
        return p.Ready(
            worker_id=self.worker_id, node_id=self.settings.node_id,
            model_id=self.engine.model_id, aliases=self.aliases, slots=self.engine.slots,
            mem_total=total, mem_free=free, model_bytes=self.engine.model_bytes,
            engine=self.engine.kind,
        )

    def _send(self, msg: p.Message) -> None:
        """Send without ever blocking the I/O thread; with no broker the frame is dropped
        (the job it belongs to is resubmitted by its gateway)."""
        assert self.dealer is not None
        try:
            self.dealer.send_multipart(p.encode(p.WORKER, msg), zmq.NOBLOCK)
        except zmq.Again:
            self.counters["frames_unsent"] += 1

    def run(self) -> None:
        """Serve until :meth:`stop`; reconnects with capped backoff when the broker is
        silent for the heartbeat liveness."""
        batch = threading.Thread(target=self.batch.run, daemon=True, name="batch")
        batch.start()
        self.poller.register(self.outbox.fd, zmq.POLLIN)
        self._connect()
        log_event(log, "worker_started", worker=self.worker_id, model=self.engine.model_id,
                  broker=self.broker.current, engine=self.engine.kind)
        interval = self.settings.heartbeat_interval
        now = time.monotonic()
        next_beat, last_beat, last_tokens = now + interval, now, 0
        broker_deadline, backoff = now + self.settings.peer_timeout, interval
        while not self._stopping.is_set():
            events = dict(self.poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
            if events.get(self.dealer):
                for _ in range(DRAIN):
                    if not self.dealer.poll(0):
                        break
                    broker_deadline = time.monotonic() + self.settings.peer_timeout
                    backoff = interval
                    self._on_broker(self.dealer.recv_multipart())
            if events.get(self.outbox.fd):
                self._forward(self.outbox.take())
            if events.get(self.monitor) and disconnected(self.monitor):
                broker_deadline = 0.0  # its process died: no need to wait out the silence
            now = time.monotonic()
            if now > broker_deadline:
                # Paranoid Pirate: a silent broker gets a fresh socket, with capped backoff.
                log_event(log, "broker_lost", logging.WARNING, broker=self.broker.current,
                          retry_in_s=backoff)
                self._abandon_jobs()
                self.broker.advance()
                self._connect()
                broker_deadline = now + self.settings.peer_timeout + backoff
                backoff = min(backoff * 2, MAX_BACKOFF)
            if now >= next_beat:
                with self._counters_lock:
                    counters = dict(self.counters)
                tokens = counters.get("tokens_generated", 0)
                self._send(p.Heartbeat(
                    running=len(self.running), mem_free=self.memory()[1],
                    tokens_per_s=round((tokens - last_tokens) / max(now - last_beat, 1e-3), 2),
                    kv_bytes=self.engine.kv_bytes,
                    counters={**counters, **self.engine.counters}))
                last_tokens, last_beat, next_beat = tokens, now, now + interval
        self._send(p.Disconnect(reason=p.Reason.LEAVING))
        self._abandon_jobs()
        self.batch.put(None)
        batch.join(STOP_TIMEOUT)
        self._forward(self.outbox.take())
        self.outbox.close()
        close_watched(self.dealer, self.monitor, linger=200)

    def stop(self) -> None:
        self._stopping.set()

    def _on_broker(self, frames: list[bytes]) -> None:
        try:
            _, msg = p.decode(frames, p.FROM_BROKER)
        except p.ProtocolError as exc:
            self.counters["frames_dropped"] += 1
            log_event(log, "frame_dropped", logging.DEBUG, reason=exc)
            return
        if msg.epoch < self.max_epoch:
            self.counters["stale_epoch"] += 1
            return
        self.max_epoch = msg.epoch
        match msg:
            case p.Job():
                self.running.add(msg.job_id)
                self.batch.put(msg)
            case p.Cancel():
                if msg.job_id in self.running:
                    self.batch.put(msg)
            case p.Redirect() if msg.endpoint != self.broker.current:
                self.broker.redirect(msg.endpoint)
                self._abandon_jobs()
                self._connect()
            case p.Disconnect():
                # The broker does not know us (it restarted, or purged us): register again.
                self._abandon_jobs()
                self._send(self._ready())

    def _forward(self, messages: list[p.Message]) -> None:
        """Send the engine threads' messages to the broker; a FINAL/FAIL ends a job here."""
        tokens = 0
        for msg in messages:
            if isinstance(msg, p.Partial):
                tokens += len(msg.token_ids)
            elif isinstance(msg, p.Final | p.Fail):
                self.running.discard(msg.job_id)
            self._send(msg)
        if tokens:
            self._count("tokens_generated", tokens)

    def _abandon_jobs(self) -> None:
        """Stop every job: the broker that owned them is gone, their gateways resubmit."""
        for job_id in self.running:
            self.batch.put(p.Cancel(job_id=job_id))
