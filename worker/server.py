"""The worker process: a DEALER to the broker on the main thread, the engine beside it.

The zguide's Paranoid Pirate worker, with one change: inference runs in one batch loop
thread (:mod:`worker.batch`), never on the I/O thread, so heartbeats keep flowing during a
long prefill and a busy worker is as alive (or as dead) to the broker as an idle one.

    main thread:  poll the broker link (common/brokerlink.py) + outbox;
                  JOB and CANCEL -> batch loop; outbox messages (a relayed job's
                  frames, RELEASE, FAIL) -> broker; heartbeat; another broker when
                  this one is lost
    batch loop:   every running job decoded together; each job's ACCEPTED, PARTIALs
                  and FINAL by its way (worker/ways.py): straight to its gateway, or
                  into the outbox for the broker to relay
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

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.brokerlink import BrokerLink
from mlx_stack.common.config import Settings
from mlx_stack.common.logs import log_event
from mlx_stack.common.meshkeys import load_keys
from mlx_stack.worker.batch import TICK, BatchLoop
from mlx_stack.worker.engine import Engine
from mlx_stack.worker.outbox import Outbox
from mlx_stack.worker.ways import Ways

log = logging.getLogger("worker")

STOP_TIMEOUT = 5.0
EXIT_STALLED = 3
"""The worker's exit status when its engine stalled (:attr:`Settings.engine_stall_timeout`):
its supervisor starts it again."""


def system_memory() -> tuple[int, int]:
    """This machine's (total, available) memory in bytes."""
    mem = psutil.virtual_memory()
    return mem.total, mem.available


class Worker:
    """Registers ``engine`` with the broker and serves its jobs until :meth:`stop`."""

    def __init__(self, engine: Engine, settings: Settings, tiers: list[str],
                 memory: Callable[[], tuple[int, int]] | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.engine = engine
        self.memory = memory or system_memory
        """(total, free) bytes as reported to the broker; the synthetic engine may fake it."""
        self.settings = settings
        self.tiers = tiers
        """The other names the model answers to (``fast``, ``standard``...)."""
        self.worker_id = f"{settings.node_id}-{engine.model_id}-{uuid.uuid4().hex[:6]}"
        self.running: set[str] = set()
        """Jobs handed to the batch loop whose FINAL or FAIL has not been sent yet."""
        self.counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()
        self.outbox = Outbox()
        self._stopping = threading.Event()
        keys = load_keys(settings.home)
        self.link = BrokerLink(settings, wire.WORKER, keys, self._ready, ctx)
        self.poller = zmq.Poller()
        self.ways = Ways(settings, keys, self.link.ctx, self.outbox, msgs.Accepted(
            job_id="", node_id=settings.node_id, worker_id=self.worker_id,
            model_id=engine.model_id), self._cancel, self._count)
        self.batch = BatchLoop(engine, self._emit, self._count, open=self.ways.open,
                               watch=self.ways.watch)

    def _count(self, key: str, n: int = 1) -> None:
        with self._counters_lock:
            self.counters[key] += n

    # ----------------------------------------------------------------- I/O side

    def _ready(self) -> msgs.Ready:
        return msgs.Ready(
            worker_id=self.worker_id, node_id=self.settings.node_id,
            model_id=self.engine.model_id, tiers=self.tiers, slots=self.engine.slots,
            mem_total=self.memory()[0], model_bytes=self.engine.model_bytes,
            engine=self.engine.kind, context_length=self.engine.context_length,
            load=self._load(0.0))

    def _load(self, tokens_per_s: float) -> msgs.WorkerLoad:
        """The load this worker reports now (READY, every HEARTBEAT)."""
        with self._counters_lock:
            counters = dict(self.counters)
        return msgs.WorkerLoad(
            running=len(self.running), mem_free=self.memory()[1], tokens_per_s=tokens_per_s,
            kv_bytes=self.engine.kv_bytes,
            counters={**counters, **self.link.counters, **self.engine.counters},
            cache_entries=self.engine.cache_entries)

    def _connect(self, reason: str = "", to: str = "") -> None:
        """Open the link (first call), or move it to another broker; the poller follows."""
        if self.link.sock is not None:
            self.poller.unregister(self.link.sock)
            self.poller.unregister(self.link.monitor)
            self._abandon_jobs()
            self.link.reconnect(reason, to)
        else:
            self.link.connect()
        self.poller.register(self.link.sock, zmq.POLLIN)
        self.poller.register(self.link.monitor, zmq.POLLIN)

    def run(self) -> int:
        """Serve until :meth:`stop`, or until the engine stalls; moves to another broker
        when the one in use is lost or silent for the heartbeat liveness (with capped
        backoff). Returns the exit status: 0, or :data:`EXIT_STALLED`."""
        batch = threading.Thread(target=self.batch.run, daemon=True, name="batch")
        batch.start()
        self.poller.register(self.outbox.fd, zmq.POLLIN)
        self._connect()
        log_event(log, "worker_started", worker=self.worker_id, model=self.engine.model_id,
                  broker=self.link.endpoint, engine=self.engine.kind)
        interval = self.settings.heartbeat_interval
        now = time.monotonic()
        next_beat, last_beat, last_tokens = now + interval, now, 0
        status = 0
        while not self._stopping.is_set():
            events = dict(self.poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
            if events.get(self.link.sock):
                for msg in self.link.receive():
                    self._on_broker(msg)
            if events.get(self.outbox.fd):
                self._forward(self.outbox.take())
            now = time.monotonic()
            if self._stalled(now):
                status = EXIT_STALLED
                break
            if events.get(self.link.monitor) and self.link.closed():
                self._connect(f"{self.link.endpoint} closed or refused the connection")
            elif self.link.silent(now):
                self._connect(f"{self.link.endpoint} silent")
            if now >= next_beat:
                with self._counters_lock:
                    tokens = self.counters["tokens_generated"]
                rate = round((tokens - last_tokens) / max(now - last_beat, 1e-3), 2)
                self.link.send(msgs.Heartbeat(load=self._load(rate),
                                              streamed=self.outbox.take_streamed()))
                self.batch.put(TICK)  # the batch thread's look at its gateway connections
                last_tokens, last_beat, next_beat = tokens, now, now + interval
        # Before the cancelled FAILs: the broker runs every job of ours again or has its
        # gateway resume it.
        self.link.send(msgs.Disconnect(reason=msgs.Reason.LEAVING))
        self._abandon_jobs()
        self.batch.put(None)
        batch.join(STOP_TIMEOUT if status == 0 else 0.0)  # a stalled loop never ends
        self._forward(self.outbox.take())
        self.outbox.close()
        if not batch.is_alive():  # its sockets: never closed under a thread using them
            self.ways.close()
        self.link.close(linger=200)
        return status

    def _stalled(self, now: float) -> bool:
        """The watchdog: whether an engine call has run past ``engine_stall_timeout``
        (said once, with the jobs it holds). Heartbeats come from this thread, so the
        broker would never notice a wedged engine by itself."""
        seconds = self.batch.stalled_for(now)
        if seconds <= self.settings.engine_stall_timeout:
            return False
        log_event(log, "engine_stalled", logging.ERROR, seconds=round(seconds, 1),
                  jobs=",".join(sorted(self.running)) or "-",
                  fix=f"the worker leaves the broker (its jobs resume on another worker) and "
                  f"exits with status {EXIT_STALLED} for its supervisor to start it again; "
                  "if a prefill this long is expected, raise engine_stall_timeout "
                  "(MLX_STACK_ENGINE_STALL_TIMEOUT)")
        return True

    def stop(self) -> None:
        self._stopping.set()

    def _on_broker(self, msg: msgs.Message) -> None:
        match msg:
            case msgs.Job():
                log_event(log, "job_started", logging.DEBUG, request=msg.request_id,
                          job=msg.job_id)
                self.running.add(msg.job_id)
                self.batch.put(msg)
            case msgs.Cancel():
                if msg.job_id in self.running:
                    self.batch.put(msg)
            case msgs.Redirect() if msg.endpoint != self.link.endpoint:
                self._connect(f"redirected to {msg.endpoint}", to=msg.endpoint)
            case msgs.Disconnect():
                # Whatever the broker held for us is gone (msgs.Reason): register again.
                log_event(log, "broker_disconnected", logging.INFO, reason=msg.reason)
                self._abandon_jobs()
                self.link.send(self._ready())

    def _forward(self, messages: list[msgs.Message]) -> None:
        """Send the outbox's messages to the broker; a RELEASE/FAIL ends a job here."""
        for msg in messages:
            if isinstance(msg, msgs.Release | msgs.Fail):
                self.running.discard(msg.job_id)
            self.link.send(msg)

    def _emit(self, msg: msgs.Partial | msgs.Final | msgs.Fail) -> None:
        """Batch loop thread: a job's message, sent its way (worker/ways.py)."""
        if isinstance(msg, msgs.Partial) and msg.token_ids:
            self._count("tokens_generated", len(msg.token_ids))
        self.ways.send(msg)

    def _cancel(self, job_id: str) -> None:
        """Batch loop thread: stop a job whose connection to its gateway dropped."""
        self.batch.put(msgs.Cancel(job_id=job_id))

    def _abandon_jobs(self) -> None:
        """Stop every job: the broker that owned them is gone, their gateways resubmit."""
        for job_id in self.running:
            self.batch.put(msgs.Cancel(job_id=job_id))
