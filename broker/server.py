"""The broker: one ROUTER socket, workers and gateways on it, jobs between them.

The loop (zguide's Majordomo broker, with the gaps closed):

    poll the ROUTER for up to one heartbeat interval
    handle each message by protocol tag (gateway or worker) and command
    every interval: heartbeat every peer, purge the silent ones, expire waiting jobs

A worker is purged when nothing has come from it for ``liveness`` intervals, busy or not
(its I/O thread heartbeats during inference). Its jobs that have sent nothing yet go back
to the head of their queue; jobs that have streamed output are failed as retryable so
that the gateway, which knows what the client has seen, resumes them elsewhere.

Each dispatch of a job to a worker has its own id, ``<job id>/<attempt>``: frames of an
earlier attempt (a worker that was purged but was only slow) never pass for the current.

Several brokers (one per node) elect one coordinator (:mod:`broker.election`) from the
ANNOUNCEs they send each other every interval. A standby broker serves nobody: it answers
every worker and gateway with REDIRECT to the coordinator (or, while none is known,
with a heartbeat, and with DISCONNECT once it becomes the coordinator itself, so that
they register and resubmit here). A coordinator that steps down redirects everyone.

Hostile input: every frame is validated (:func:`common.protocol.decode`) before anything
acts on it, then checked against what its sender is: an identity known as a worker may
only speak the worker protocol, and so on. Whatever is refused is counted by reason and
shown as ``rejected`` in the CONTROL status reply. A handler that still fails is logged
and counted as ``handler_error``, never allowed to stop the loop that serves everyone.
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from broker.election import BrokerInfo, Election
from broker.routing import Chooser
from broker.state import JobState, WorkerState
from common import protocol as p
from common.config import ENDPOINT, Settings, is_loopback
from common.discovery import Advert, Discovery
from common.logs import log_event
from common.meshkeys import MeshSecretError, load_keys
from common.transport import (
    admit_members,
    close_watched,
    configure,
    disconnected,
    watch_disconnects,
)

log = logging.getLogger("broker")

ROUTE_HISTORY = 1000
MAX_SLOTS = 1024
"""What a broker endpoint in an ANNOUNCE must look like: workers and gateways would be
redirected there."""


class Broker:
    """Routes jobs from gateways to workers. Single-threaded; call :meth:`run`."""

    def __init__(self, settings: Settings, ctx: zmq.Context | None = None) -> None:
        self.settings = settings
        self.ctx = ctx or zmq.Context.instance()
        self.workers: dict[bytes, WorkerState] = {}
        self.gateways: dict[bytes, float] = {}
        self.purged_gateways: set[bytes] = set()
        self.jobs: dict[str, JobState] = {}
        self.queues: dict[str, collections.deque[str]] = collections.defaultdict(
            collections.deque
        )
        self.known_models: set[str] = set()
        self.routes: collections.deque[dict[str, Any]] = collections.deque(maxlen=ROUTE_HISTORY)
        self.counters: collections.Counter[str] = collections.Counter()
        self.rejected: collections.Counter[str] = collections.Counter()
        """Messages refused, by reason (``ProtocolError.reason`` or the broker's own)."""
        self.chooser = Chooser()
        self.started = time.time()
        self.session = uuid.uuid4().hex
        self.keys = load_keys(settings.home)
        if self.keys is None and not is_loopback(settings.broker_host):
            raise MeshSecretError(
                f"refusing to listen on {settings.broker_host}: this node has no mesh secret, "
                "so anyone on the network could join. Run `mlx-stack mesh enable` (first "
                "Mac) or `mlx-stack mesh enable --join TOKEN`, or bind to 127.0.0.1")
        self.advertise = settings.advertise  # once: the address must not move under us
        if not is_loopback(settings.broker_host) and is_loopback(
                self.advertise.removeprefix("tcp://").rsplit(":", 1)[0]):
            raise ValueError(
                f"listening on {settings.broker_host} but other Macs would be told to reach "
                f"this one at {self.advertise}; set broker_advertise = \"tcp://ADDRESS:"
                f"{settings.broker_port}\" or run `mlx-stack mesh enable --interface ADDRESS`")
        self.auth = admit_members(self.ctx, self.keys) if self.keys else None
        self.socket = configure(self.ctx.socket(zmq.ROUTER), settings, self.keys)
        self.endpoint = f"tcp://{settings.broker_host}:{settings.broker_port}"
        try:
            self.socket.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self.socket.close(0)
            if self.auth is not None:
                self.auth.stop()
            raise ValueError(f"cannot listen on {self.endpoint}: {exc.strerror}; is another "
                             "broker running there? Stop it or choose --port") from None
        peers = [e for e in settings.peer_list if e != self.advertise]
        self.election = Election(
            BrokerInfo(node_id=settings.node_id, endpoint=self.advertise,
                       priority=settings.priority, started=self.started),
            timeout=settings.peer_timeout, hold_down=settings.hold_down,
            # Alone, there is nobody to listen for: coordinate at once.
            now=time.monotonic() - (0 if peers or settings.mdns_interfaces
                                    else settings.peer_timeout))
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        # Connections turned away by CURVE/ZAP (no secret, a foreign one, not a member).
        self.refusals = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH, f"inproc://refusals-{self.session}")
        self.poller.register(self.refusals, zmq.POLLIN)
        self.peer_sockets: dict[str, zmq.Socket] = {}
        self.peer_monitors: dict[zmq.Socket, str] = {}
        self.removed: set[str] = set()
        """Peers removed with ``mesh remove``: their announcements are ignored."""
        for endpoint in peers:
            self._add_peer(endpoint)
        self.discovery = Discovery(Advert(
            mesh=self.keys.mesh_id if self.keys else settings.mesh_id,
            node_id=settings.node_id, endpoint=self.advertise, priority=settings.priority,
            started=self.started),
            settings.mdns_interfaces) if settings.mdns_interfaces else None
        self.leader = ""
        self.followers: dict[bytes, bytes] = {}
        """Workers and gateways heard while standby (identity -> protocol tag)."""
        self._stopping = False
        self.election.decide(time.monotonic())

    def _announcement(self) -> p.Announce:
        me = self.election.me
        return p.Announce(node_id=me.node_id, endpoint=me.endpoint, priority=me.priority,
                          started=me.started, active=me.active, epoch=self.epoch)

    def _heard(self, msg: p.Announce) -> None:
        if msg.endpoint in self.removed:
            return
        self.election.heard(BrokerInfo(
            node_id=msg.node_id, endpoint=msg.endpoint, priority=msg.priority,
            started=msg.started, epoch=msg.epoch, active=msg.active), time.monotonic())

    def _drain_peer(self, sock: zmq.Socket) -> None:
        """Announcements that peers sent back on our own connection to them."""
        for _ in range(100):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                _, msg = p.decode(frames, p.FROM_BROKER)
            except p.ProtocolError as exc:
                self._reject(exc.reason, exc)
                continue
            if isinstance(msg, p.Announce) and self._plausible(msg):
                self._heard(msg)

    def _add_peer(self, endpoint: str) -> None:
        """Announce ourselves to the broker at ``endpoint`` from now on."""
        if (endpoint in self.peer_sockets or endpoint in self.removed
                or endpoint == self.advertise):
            return
        sock = configure(self.ctx.socket(zmq.DEALER), self.settings, self.keys)
        sock.setsockopt(zmq.SNDHWM, 10)  # announcements go stale: never queue many
        monitor = watch_disconnects(sock)
        sock.connect(endpoint)
        self.peer_sockets[endpoint] = sock
        self.peer_monitors[monitor] = endpoint
        self.poller.register(monitor, zmq.POLLIN)
        self.poller.register(sock, zmq.POLLIN)
        log_event(log, "peer_added", endpoint=endpoint)

    def _remove_peer(self, endpoint: str) -> bool:
        """Stop announcing to ``endpoint`` and forget it; whether it was known at all."""
        known = endpoint in self.peer_sockets or endpoint in self.election.peers
        self.removed.add(endpoint)
        sock = self.peer_sockets.pop(endpoint, None)
        if sock is not None:
            monitor = next(m for m, e in self.peer_monitors.items() if e == endpoint)
            del self.peer_monitors[monitor]
            self.poller.unregister(sock)
            self.poller.unregister(monitor)
            close_watched(sock, monitor)
        self.election.lost(endpoint)
        self._elect(time.monotonic())
        log_event(log, "peer_removed", endpoint=endpoint)
        return known

    @property
    def epoch(self) -> int:
        return self.election.max_epoch

    @property
    def active(self) -> bool:
        return self.election.me.active

    # ----------------------------------------------------------------- main loop

    def run(self) -> None:
        """Serve until :meth:`stop` is called (from a signal handler)."""
        log_event(log, "broker_started", endpoint=self.endpoint, node=self.settings.node_id)
        interval = self.settings.heartbeat_interval
        next_tick = time.monotonic() + interval
        while not self._stopping:
            timeout = max(0.0, next_tick - time.monotonic())
            ready = dict(self.poller.poll(timeout * 1000))
            if self.socket in ready:
                # Drain what is there, bounded so the timers still run under load.
                for _ in range(1000):
                    try:
                        frames = self.socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frames(frames)
            if self.refusals in ready:
                self._count_refusals()
            for sock in self.peer_sockets.values():
                if sock in ready:
                    self._drain_peer(sock)
            lost = [e for m, e in self.peer_monitors.items() if m in ready and disconnected(m)]
            for endpoint in lost:  # its process died: re-elect now, not after the timeout
                self.election.lost(endpoint)
            now = time.monotonic()
            if lost:
                self._elect(now)
            if now >= next_tick:
                self._tick(now)
                next_tick = now + interval
        for identity in [*self.workers, *self.gateways]:
            self._send(identity, self._protocol_of(identity), p.Disconnect())
        for monitor, endpoint in self.peer_monitors.items():
            close_watched(self.peer_sockets[endpoint], monitor)
        if self.discovery is not None:
            self.discovery.close()
        self.socket.disable_monitor()
        self.refusals.close(linger=0)
        self.socket.close(linger=100)
        if self.auth is not None:
            self.auth.stop()

    def stop(self) -> None:
        self._stopping = True

    def _count_refusals(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self.refusals.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.counters["handshake_refused"] += 1
            log_event(log, "connection_refused", logging.INFO, peer=event["endpoint"],
                      reason="no mesh secret, a foreign one, or not a member")

    def _on_frames(self, frames: list[bytes]) -> None:
        """Validate one message from the ROUTER, then act on it; never raises."""
        if len(frames) < 2:
            self._reject("frame_count", f"{len(frames)} frames")
            return
        identity = frames[0]
        try:
            protocol, msg = p.decode(frames[1:], p.TO_BROKER)
        except p.ProtocolError as exc:
            self._reject(exc.reason, exc)
            return
        role = self._role_of(identity)
        if role is not None and role != protocol:
            self._reject("wrong_role", f"{msg.COMMAND.name} on {protocol.decode()} from a "
                         f"{role.decode()} peer")
            return
        try:
            self._on_message(identity, protocol, msg)
        except Exception as exc:  # a bug must not take the whole mesh's broker down
            self.rejected["handler_error"] += 1
            log.exception("handler_error command=%s error=%r", msg.COMMAND.name, exc)

    def _reject(self, reason: str, detail: object) -> None:
        """Count and drop a message the broker will not act on."""
        self.rejected[reason] += 1
        self.counters["dropped"] += 1
        log_event(log, "frame_dropped", logging.DEBUG, reason=reason, detail=detail)

    def _role_of(self, identity: bytes) -> bytes | None:
        """The protocol tag an identity has spoken so far (None if new)."""
        if identity in self.workers:
            return p.WORKER
        if identity in self.gateways:
            return p.GATEWAY
        return self.followers.get(identity)

    def _plausible(self, msg: p.Announce) -> bool:
        """Whether an ANNOUNCE describes a broker one could be redirected to, with an epoch
        that leaves room for one more (a higher one, taken over, would not be on the
        wire: every peer would refuse this broker's messages)."""
        if (ENDPOINT.fullmatch(msg.endpoint) and 0 <= msg.epoch < p.INT_MAX
                and msg.started >= 0):
            return True
        self._reject("bad_announce", f"endpoint={msg.endpoint[:80]!r} epoch={msg.epoch}")
        return False

    def _on_message(self, identity: bytes, protocol: bytes, msg: p.Message) -> None:
        if isinstance(msg, p.Announce):
            if not self._plausible(msg):
                return
            self._heard(msg)
            # Answer on this connection: our own socket to that broker may still be in
            # reconnect backoff, and a broker that just started must learn of us now.
            self._send(identity, p.PEER, self._announcement())
        elif not self.active:
            self._on_standby(identity, protocol, msg)
        elif protocol == p.WORKER:
            self._on_worker(identity, msg)
        else:
            self._on_gateway(identity, msg)

    def _on_standby(self, identity: bytes, protocol: bytes, msg: p.Message) -> None:
        """Serve nobody: point the sender at the coordinator, or ask it to wait."""
        if isinstance(msg, p.Control):
            self._send(identity, protocol, self._control(msg))
            return
        self.followers[identity] = protocol
        if self.leader:
            self._send(identity, protocol, p.Redirect(endpoint=self.leader))
        else:
            self._send(identity, protocol, p.Heartbeat(session=self.session))

    # ----------------------------------------------------------------- workers

    def _on_worker(self, identity: bytes, msg: p.Message) -> None:
        now = time.monotonic()
        if isinstance(msg, p.Ready):
            self._register(identity, msg, now)
            return
        worker = self.workers.get(identity)
        if worker is None:
            # Not registered (purged, or the broker restarted): ask it to register again.
            self._reject("unregistered", f"{msg.COMMAND.name} from an unregistered worker")
            if not isinstance(msg, p.Disconnect):
                self._send(identity, p.WORKER, p.Disconnect())
            return
        worker.expires = now + self.settings.peer_timeout
        worker.last_seen = now
        match msg:
            case p.Heartbeat():
                worker.mem_free, worker.active = msg.mem_free, msg.active
                worker.tokens_per_s, worker.counters = msg.tokens_per_s, msg.counters
                worker.kv_bytes = msg.kv_bytes
            case p.Partial():
                job = self._job_of(worker, msg.job_id)
                if job is not None:
                    job.streamed = True
                    job.tokens += len(msg.token_ids)
                    if job.gateway is not None:
                        msg.job_id = job.submit.job_id
                        self._send(job.gateway, p.GATEWAY, msg)
            case p.Final():
                job = self._job_of(worker, msg.job_id)
                if job is not None:
                    self._finish(job, msg, "ok")
            case p.Fail():
                job = self._job_of(worker, msg.job_id)
                if job is None:
                    pass
                elif msg.retryable:
                    self._lose(job, msg.error)
                    self._dispatch()
                else:
                    self._finish(job, msg, "failed")
            case p.Disconnect():
                self._purge_worker(worker, "disconnected")

    def _register(self, identity: bytes, ready: p.Ready, now: float) -> None:
        if not (ready.model_id and 1 <= ready.slots <= MAX_SLOTS):
            self._reject("bad_ready", "READY without a model or with slots out of range")
            log_event(log, "ready_refused", logging.WARNING, worker=ready.worker_id[:80],
                      model=ready.model_id[:80], slots=ready.slots)
            return
        # A worker that registers again has abandoned whatever it was running.
        for other in list(self.workers.values()):
            if other.info.worker_id == ready.worker_id or other.identity == identity:
                self._purge_worker(other, "registered again")
        worker = WorkerState(
            identity=identity, info=ready, expires=now + self.settings.peer_timeout,
            mem_free=ready.mem_free, last_seen=now,
        )
        self.workers[identity] = worker
        self.known_models |= worker.names
        log_event(log, "worker_ready", worker=ready.worker_id, node=ready.node_id,
                  model=ready.model_id, slots=ready.slots, engine=ready.engine)
        self._dispatch()

    def _job_of(self, worker: WorkerState, dispatch_id: str) -> JobState | None:
        """The job of a dispatch id if it is this worker's current attempt; anything stale
        or foreign is ignored."""
        job_id = dispatch_id.rpartition("/")[0]
        job = self.jobs.get(job_id)
        if job is None or job.worker != worker.identity or job.dispatch_id != dispatch_id:
            return None
        return job

    def _purge_worker(self, worker: WorkerState, reason: str) -> None:
        del self.workers[worker.identity]
        self.counters["workers_purged"] += 1
        level = logging.INFO if reason == "disconnected" else logging.WARNING
        log_event(log, "worker_purged", level, worker=worker.info.worker_id,
                  node=worker.info.node_id, reason=reason, jobs=len(worker.in_flight))
        for job_id in list(worker.in_flight):
            self._lose(self.jobs[job_id], f"worker {worker.info.worker_id} lost ({reason})")
        self._dispatch()

    def _lose(self, job: JobState, reason: str) -> None:
        """A job's worker is gone (or gave it up): run it again if nothing reached the
        client yet, else tell the gateway to resume it with what the client has seen."""
        self._release(job)
        if job.streamed or job.retries >= self.settings.max_retries or job.gateway is None:
            self._finish(job, p.Fail(
                job_id=job.submit.job_id, code=p.ErrorCode.WORKER_LOST, retryable=True,
                error=f"{reason} after {job.tokens} tokens; resubmit with resume tokens"),
                "worker_lost")
            return
        job.retries += 1
        self.counters["redispatched"] += 1
        log_event(log, "job_redispatched", job=job.submit.job_id, reason=reason)
        self.queues[job.submit.model].appendleft(job.submit.job_id)

    # ----------------------------------------------------------------- gateways

    def _on_gateway(self, identity: bytes, msg: p.Message) -> None:
        if isinstance(msg, p.Control) and identity not in self.gateways:
            # A one-off question (`mlx-stack mesh ...`): answer it, register nobody.
            self._send(identity, p.GATEWAY, self._control(msg))
            return
        if identity not in self.gateways:  # let a new gateway know at once we are here
            self._send(identity, p.GATEWAY, p.Heartbeat(session=self.session))
        if identity in self.purged_gateways:
            # Its jobs were dropped while it was silent: make it resubmit them.
            self.purged_gateways.discard(identity)
            self._send(identity, p.GATEWAY, p.Disconnect())
        self.gateways[identity] = time.monotonic() + self.settings.peer_timeout
        match msg:
            case p.Submit():
                self._submit(identity, msg)
            case p.Cancel():
                self._cancel(identity, msg.job_id)
            case p.Control():
                self._send(identity, p.GATEWAY, self._control(msg))
            case p.Disconnect():
                self._purge_gateway(identity, silent=False)

    def _submit(self, gateway: bytes, submit: p.Submit) -> None:
        def refuse(code: p.ErrorCode, error: str, retryable: bool = False) -> None:
            self.counters[f"rejected_{code}"] += 1
            self._send(gateway, p.GATEWAY, p.Fail(
                job_id=submit.job_id, error=error, code=code, retryable=retryable))

        try:
            p.from_dict(p.GenerationRequest, submit.request)
        except p.ProtocolError as exc:
            return refuse(p.ErrorCode.INVALID_REQUEST, str(exc))
        if submit.job_id in self.jobs:
            return refuse(p.ErrorCode.INVALID_REQUEST, f"job id {submit.job_id} is in use")
        if submit.attempt and submit.model not in self.known_models:
            # Admitted before under another coordinator: its workers are on their way.
            self.known_models.add(submit.model)
        if submit.model not in self.known_models:
            return refuse(p.ErrorCode.MODEL_NOT_FOUND,
                          f"The model '{submit.model}' does not exist in this mesh. "
                          f"Available: {', '.join(sorted(self.known_models)) or 'none yet'}.")
        queue = self.queues[submit.model]
        if len(queue) >= self.settings.queue_size and not submit.attempt:
            return refuse(p.ErrorCode.QUEUE_FULL,
                          f"{len(queue)} requests already wait for '{submit.model}'; "
                          "retry later", retryable=True)
        now = time.monotonic()
        self.jobs[submit.job_id] = JobState(
            submit=submit, gateway=gateway, enqueued=now,
            deadline=now + max(0.0, min(submit.deadline, self.settings.request_timeout)),
        )
        if submit.attempt:
            queue.appendleft(submit.job_id)
        else:
            queue.append(submit.job_id)
        self._dispatch()

    def _cancel(self, gateway: bytes, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.gateway != gateway:
            return
        self.counters["cancelled"] += 1
        job.gateway = None
        if job.worker is None:
            self._forget(job, "cancelled")
        else:
            self._send(job.worker, p.WORKER, p.Cancel(job_id=job.dispatch_id))

    def _purge_gateway(self, gateway: bytes, silent: bool = True) -> None:
        self.gateways.pop(gateway, None)
        jobs = [j for j in self.jobs.values() if j.gateway == gateway]
        for job in jobs:
            self._cancel(gateway, job.submit.job_id)
        if silent and jobs:
            self._send(gateway, p.GATEWAY, p.Disconnect())
            if len(self.purged_gateways) > 10_000:
                self.purged_gateways.clear()
            self.purged_gateways.add(gateway)

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self) -> None:
        """Give waiting jobs to free workers, oldest queue heads first, until none fits."""
        progress = True
        while progress:
            progress = False
            for model, queue in self.queues.items():
                if not queue:
                    continue
                job = self.jobs[queue[0]]
                candidates = [w for w in self.workers.values() if model in w.names]
                worker, scored = self.chooser.choose(candidates, job.submit.node_id)
                if worker is None:
                    continue
                queue.popleft()
                self._start(job, worker, scored)
                progress = True

    def _start(self, job: JobState, worker: WorkerState,
               scored: list[tuple[WorkerState, float]]) -> None:
        submit = job.submit
        job.worker = worker.identity
        job.dispatch_id = f"{submit.job_id}/{job.retries}"
        worker.in_flight.add(submit.job_id)
        if job.route:
            job.route["retries"] = job.retries
        else:
            job.route = {"job_id": submit.job_id, "model": submit.model, "outcome": "running",
                         "retries": 0, "time": time.time()}
            self.routes.append(job.route)
        job.route.update(
            candidates=[{"worker_id": w.info.worker_id, "node_id": w.info.node_id,
                         "score": round(s, 4)} for w, s in scored],
            worker_id=worker.info.worker_id, node_id=worker.info.node_id,
            queue_wait_ms=round((time.monotonic() - job.enqueued) * 1000, 2),
        )
        self._send(worker.identity, p.WORKER, p.Job(
            job_id=job.dispatch_id, request=submit.request,
            resume_token_ids=submit.resume_token_ids, resume_text=submit.resume_text))
        if job.gateway is not None:
            self._send(job.gateway, p.GATEWAY, p.Accepted(
                job_id=submit.job_id, node_id=worker.info.node_id,
                worker_id=worker.info.worker_id, model_id=worker.info.model_id))

    def _release(self, job: JobState) -> None:
        if job.worker is not None and job.worker in self.workers:
            self.workers[job.worker].in_flight.discard(job.submit.job_id)
        job.worker = None

    def _finish(self, job: JobState, msg: p.Final | p.Fail, outcome: str) -> None:
        """End a job: tell its gateway, free its slot, record the outcome."""
        self._release(job)
        if job.gateway is not None:
            msg.job_id = job.submit.job_id
            self._send(job.gateway, p.GATEWAY, msg)
        self._forget(job, outcome if job.gateway is not None else "cancelled")
        self._dispatch()

    def _forget(self, job: JobState, outcome: str) -> None:
        self.jobs.pop(job.submit.job_id, None)
        queue = self.queues.get(job.submit.model)
        if queue and job.submit.job_id in queue:
            queue.remove(job.submit.job_id)
        if job.route:
            job.route["outcome"] = outcome

    # ----------------------------------------------------------------- timers

    def _tick(self, now: float) -> None:
        self._elect(now)
        for worker in [w for w in self.workers.values() if w.expires < now]:
            self._purge_worker(worker, "heartbeat timeout")
        for gateway in [g for g, expires in self.gateways.items() if expires < now]:
            self._purge_gateway(gateway)
        self._expire_waiting(now)
        beat = p.Heartbeat(session=self.session)
        for identity in list(self.workers):
            self._send(identity, p.WORKER, beat)
        for identity in list(self.gateways):
            self._send(identity, p.GATEWAY, beat)

    def _elect(self, now: float) -> None:
        """Announce ourselves, then act on the election's verdict."""
        for endpoint in self.discovery.take() if self.discovery else ():
            self._add_peer(endpoint)
        announce = p.encode(p.PEER, self._announcement())
        for sock in self.peer_sockets.values():
            try:
                sock.send_multipart(announce, zmq.NOBLOCK)
            except zmq.Again:
                self.counters["announce_unsent"] += 1
        decision = self.election.decide(now)
        if self.discovery is not None:
            self.discovery.set_coordinator(decision.active)
        leader = decision.leader.endpoint if decision.leader else ""
        if decision.changed:
            log_event(log, "role_changed", logging.WARNING,
                      role="active" if decision.active else "standby", epoch=self.epoch,
                      leader=leader or self.endpoint)
        if decision.changed and decision.active:
            # Those that waited on us as standby register and resubmit here now.
            for identity, protocol in self.followers.items():
                self._send(identity, protocol, p.Disconnect())
            self.followers.clear()
        elif decision.changed:
            self._hand_over(leader)
        elif leader and leader != self.leader:
            for identity, protocol in self.followers.items():
                self._send(identity, protocol, p.Redirect(endpoint=leader))
        self.leader = leader

    def _hand_over(self, leader: str) -> None:
        """Step down: send every worker and gateway to the new coordinator. Gateways
        resubmit their open jobs there with what their clients have seen."""
        reply = p.Redirect(endpoint=leader) if leader else p.Disconnect()
        for identity in list(self.workers):
            self._send(identity, p.WORKER, reply)
            self.followers[identity] = p.WORKER
        for identity in list(self.gateways):
            self._send(identity, p.GATEWAY, reply)
            self.followers[identity] = p.GATEWAY
        self.workers.clear()
        self.gateways.clear()
        self.jobs.clear()
        self.queues.clear()

    def _expire_waiting(self, now: float) -> None:
        """Fail jobs past their deadline (cancelling any that run), and queued jobs that
        waited longer than the grace period for a model with no live worker at all."""
        for job in [j for j in self.jobs.values() if j.worker and j.gateway and now > j.deadline]:
            gateway = job.gateway
            self._cancel(gateway, job.submit.job_id)  # the worker confirms, freeing the slot
            self._send(gateway, p.GATEWAY, p.Fail(
                job_id=job.submit.job_id, code=p.ErrorCode.DEADLINE,
                error="the request's deadline passed while it ran"))
        live = set().union(*(w.names for w in self.workers.values()))
        for model, queue in list(self.queues.items()):
            for job_id in list(queue):
                job = self.jobs[job_id]
                if now > job.deadline:
                    fail = p.Fail(job_id=job_id, code=p.ErrorCode.DEADLINE,
                                  error="the request's deadline passed while it waited")
                elif model not in live and now - job.enqueued > self.settings.grace:
                    fail = p.Fail(job_id=job_id, code=p.ErrorCode.NO_WORKER, retryable=True,
                                  error=f"no worker for '{model}' is up; it may be restarting")
                else:
                    continue
                self._finish(job, fail, fail.code)

    # ----------------------------------------------------------------- control

    def _control(self, msg: p.Control) -> p.ControlReply:
        if msg.op in ("status", "nodes"):
            result: Any = self.status()
        elif msg.op == "models":
            result = self.models()
        elif msg.op == "routes":
            last = msg.args.get("last", 20)
            last = last if isinstance(last, int) and last > 0 else 20
            result = list(self.routes)[-last:]
        elif msg.op in ("add_peer", "remove_peer") and isinstance(
                endpoint := msg.args.get("endpoint"), str) and ENDPOINT.fullmatch(endpoint):
            if msg.op == "add_peer":
                self.removed.discard(endpoint)
                self._add_peer(endpoint)
                result = True
            else:
                result = self._remove_peer(endpoint)
        else:
            return p.ControlReply(
                request_id=msg.request_id, ok=False, epoch=self.epoch,
                error=f"unknown op {msg.op!r} or bad arguments; use status|nodes|models|routes"
                "|add_peer|remove_peer (with endpoint='tcp://host:port')")
        return p.ControlReply(request_id=msg.request_id, ok=True, result=result, epoch=self.epoch)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "node_id": self.settings.node_id,
            "endpoint": self.advertise,
            "role": "active" if self.active else "standby",
            "leader": self.advertise if self.active else self.leader,
            "epoch": self.epoch,
            "priority": self.settings.priority,
            "peers": [{"node_id": b.node_id, "endpoint": b.endpoint, "active": b.active,
                       "epoch": b.epoch, "priority": b.priority,
                       "last_seen_s": round(now - b.last_seen, 3)}
                      for b in self.election.live(now)],
            "uptime_s": round(time.time() - self.started, 1),
            "workers": [w.summary(now) for w in self.workers.values()],
            "queues": {m: len(q) for m, q in self.queues.items() if q},
            "jobs": len(self.jobs),
            "gateways": len(self.gateways),
            "counters": dict(self.counters),
            "rejected": dict(self.rejected),
        }

    def models(self) -> list[dict[str, Any]]:
        """Every name a request may use, with the model it resolves to."""
        names: dict[str, dict[str, Any]] = {}
        for w in self.workers.values():
            for name in sorted(w.names):
                entry = names.setdefault(name, {"id": name, "model_id": w.info.model_id,
                                                "engine": w.info.engine, "workers": 0})
                entry["workers"] += 1
        return sorted(names.values(), key=lambda e: e["id"])

    # ----------------------------------------------------------------- sending

    def _protocol_of(self, identity: bytes) -> bytes:
        return p.WORKER if identity in self.workers else p.GATEWAY

    def _send(self, identity: bytes, protocol: bytes, msg: p.Message) -> None:
        msg.epoch = self.epoch
        try:
            self.socket.send_multipart([identity, *p.encode(protocol, msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: gone; EAGAIN: not keeping up
            self.counters["send_failed"] += 1
            log_event(log, "send_failed", logging.DEBUG, error=exc.strerror)
