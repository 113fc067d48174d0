"""The job table: workers, gateways, their jobs, the per-model queues and the route log.
No I/O, and no clock: time comes only from each transition's ``now`` (monotonic seconds).

Every transition (a worker registers, reports, streams, ends or is lost; a gateway
submits, cancels or goes away; the clock passes a deadline) changes the table and returns
the messages to send as ``(identity, protocol tag, message)``. Waiting jobs are given to
free workers once, at the end of each transition. The broker's loop decodes frames,
checks who sent them and sends what the table returns (:mod:`broker.server`), so
everything here is tested without sockets (tests/test_jobs.py).

A worker or a gateway is purged when nothing has come from it for the peer timeout, busy
or not (a worker's I/O thread heartbeats during inference). A purged worker's jobs that
have sent nothing yet go back to the head of their queue; jobs that have streamed output
are failed as retryable so that the gateway, which knows what the client has seen,
resumes them elsewhere. A purged gateway's jobs are cancelled, and it is told to resubmit
them (DISCONNECT ``jobs_dropped``) should it still be there.

Each dispatch of a job to a worker has its own id, ``<job id>/<attempt>``: frames of an
earlier attempt (a worker that was purged but was only slow) never pass for the current.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable

from mlx_stack.broker import tiers
from mlx_stack.broker.replies import lost, reply_to
from mlx_stack.broker.routing import Chooser
from mlx_stack.broker.state import Gateways, JobState, Released, WorkerState
from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.config import Settings
from mlx_stack.common.logs import log_event
from mlx_stack.common.status import ModelEntry, Route

log = logging.getLogger("broker")

ROUTE_HISTORY = 1000
MAX_SLOTS = 1024
MODEL_MEMORY = 600.0
"""Seconds a model name is still known (a request for it waits the grace period rather
than a 404) after its last worker left."""
MAX_MODELS = 1024
"""Most model names remembered: a flood of names (resubmissions name any model) evicts
the longest unserved, never grows memory."""

Send = tuple[bytes, bytes, msgs.Message]
"""A message to send: (ROUTER identity, protocol tag, message)."""


class JobTable:
    """What the coordinator knows of workers, gateways and jobs, and how each event
    changes it. ``session`` is the broker's (its heartbeats carry it); ``wall_offset``
    turns ``now`` into wall-clock time for the route log."""

    def __init__(self, settings: Settings, session: str = "", wall_offset: float = 0.0) -> None:
        self.settings = settings
        self.session = session
        self.wall_offset = wall_offset
        self.workers: dict[bytes, WorkerState] = {}
        self.gateways = Gateways()
        self.jobs: dict[str, JobState] = {}
        self.released: dict[str, Released] = {}
        """Dispatch id -> a job its worker's RELEASE ended lately (:class:`Released`)."""
        self.queues: dict[str, collections.deque[str]] = collections.defaultdict(
            collections.deque)
        self.known_models: dict[str, float] = {}
        """Model names served lately, with when a live worker last had them."""
        self.routes: collections.deque[Route] = collections.deque(maxlen=ROUTE_HISTORY)
        self.counters: collections.Counter[str] = collections.Counter()
        """The broker's counters, its loop's included."""
        self.rejected: collections.Counter[str] = collections.Counter()
        """Messages refused, by reason (``ProtocolError.reason`` or the broker's own)."""
        self.chooser = Chooser(settings.cache_routing)
        self.ambiguous: set[str] = set()
        """Names that workers of several models serve, already warned of."""
        self._out: list[Send] = []

    # ----------------------------------------------------------------- transitions

    def worker_message(self, identity: bytes, msg: msgs.Message, now: float) -> list[Send]:
        """Anything a worker sends (READY, HEARTBEAT, a relayed job's ACCEPTED, PARTIAL and
        FINAL, RELEASE, FAIL, DISCONNECT)."""
        if isinstance(msg, msgs.Ready):
            self._register(identity, msg, now)
            return self._sent(now)
        worker = self.workers.get(identity)
        if worker is None:
            # Not registered (purged, or the broker restarted): ask it to register again.
            self.reject("unregistered", f"{msg.COMMAND.name} from an unregistered worker")
            if not isinstance(msg, msgs.Disconnect):
                self._send(identity, wire.WORKER, msgs.Disconnect(reason=msgs.Reason.UNKNOWN))
            return self._sent(now)
        worker.expires = now + self.settings.peer_timeout
        worker.last_seen = now
        match msg:
            case msgs.Heartbeat():
                self.counters["prefix_chains_trimmed"] += worker.report(msg.load)
                for dispatch_id in msg.streamed:
                    if (job := self._job_of(worker, dispatch_id)) is not None:
                        job.streamed = True
            case msgs.Accepted() | msgs.Partial() | msgs.Final():
                # A relayed job's output: passed on; only the RELEASE ends the job here.
                job = self._job_of(worker, msg.job_id)
                if job is not None:
                    # Output reached the client: the job can no longer run again unseen.
                    job.streamed = job.streamed or isinstance(msg, msgs.Partial)
                    if job.gateway is not None:
                        self._send(job.gateway, wire.GATEWAY, msg)
            case msgs.Release():
                job = self._job_of(worker, msg.job_id)
                if job is not None:
                    self.counters["prefix_chains_missed"] += job.cache_served(worker, msg)
                    if job.gateway is not None:
                        self.released[msg.job_id] = Released(
                            identity, job.gateway, now + msgs.RELEASED_WATCH_S)
                    self._end(job, "ok")
            case msgs.Fail() if (done := self.released.pop(msg.job_id, None)) is not None:
                self._send(done.gateway, wire.GATEWAY, lost(msg.job_id, msg.error))
            case msgs.Fail() if (job := self._job_of(worker, msg.job_id)) is not None:
                if msg.retryable:
                    self._lose(job, msg.error)
                else:
                    self._end(job, "failed", msg)
            case msgs.Disconnect():
                self._purge_worker(worker, "disconnected")
        return self._sent(now)

    def gateway_message(self, identity: bytes, msg: msgs.Message, now: float) -> list[Send]:
        """Anything a gateway sends: it is live for the peer timeout from ``now`` (a new one
        hears our heartbeat at once, one whose jobs were dropped is told so). A CONTROL from
        no gateway is a one-off question (``mlx-stack mesh``, answered by broker/control.py):
        it registers nobody."""
        if isinstance(msg, msgs.Control) and identity not in self.gateways:
            return []
        new, dropped = self.gateways.heard(identity, now + self.settings.peer_timeout)
        if new:
            self._send(identity, wire.GATEWAY, msgs.Heartbeat(session=self.session))
        if dropped:
            self._send(identity, wire.GATEWAY, msgs.Disconnect(reason=msgs.Reason.JOBS_DROPPED))
        match msg:
            case msgs.Submit():
                self._submit(identity, msg, now)
            case msgs.Cancel() if (job := self.jobs.get(msg.job_id)) and job.gateway == identity:
                self._cancel(job)
            case msgs.Disconnect():
                self._purge_gateway(identity, silent=False)
        return self._sent(now)

    def _submit(self, gateway: bytes, submit: msgs.Submit, now: float) -> None:
        """A gateway's SUBMIT: queue it, or refuse it at once (404, 429, a job id in use).
        One that does not decode is refused before it gets here (broker/server.py)."""
        def refuse(code: msgs.ErrorCode, error: str, retryable: bool = False) -> None:
            self.counters[f"rejected_{code}"] += 1
            self._send(gateway, wire.GATEWAY, msgs.Fail(
                job_id=submit.job_id, error=error, code=code, retryable=retryable))

        if submit.job_id in self.jobs:
            return refuse(msgs.ErrorCode.INVALID_REQUEST, f"job id {submit.job_id} is in use")
        if submit.attempt and submit.model not in self.known_models:
            # Admitted before under another coordinator: its workers are on their way.
            self.know([submit.model], now)
        if submit.model not in self.known_models:
            return refuse(msgs.ErrorCode.MODEL_NOT_FOUND,
                          f"The model '{submit.model}' does not exist in this mesh. "
                          f"Available: {', '.join(sorted(self.known_models)) or 'none yet'}.")
        queue = self.queues[submit.model]
        if len(queue) >= self.settings.queue_size and not submit.attempt:
            return refuse(msgs.ErrorCode.QUEUE_FULL,
                          f"{len(queue)} requests already wait for '{submit.model}'; "
                          "retry later", retryable=True)
        self.jobs[submit.job_id] = JobState(
            submit=submit, gateway=gateway, enqueued=now,
            deadline=now + max(0.0, min(submit.deadline, self.settings.request_timeout)),
        )
        if submit.attempt:
            queue.appendleft(submit.job_id)
        else:
            queue.append(submit.job_id)

    def tick(self, now: float) -> list[Send]:
        """Every heartbeat interval: purge silent gateways and workers; fail jobs past
        their deadline (cancelling any that run) and queued jobs that waited longer than
        the grace period for a model with no live worker at all; heartbeat every worker
        and gateway."""
        for gateway in self.gateways.silent(now):
            self._purge_gateway(gateway, silent=True)
        for worker in [w for w in self.workers.values() if w.expires < now]:
            self._purge_worker(worker, "heartbeat timeout")
        while self.released and self.released[oldest := next(iter(self.released))].until < now:
            del self.released[oldest]  # in the order released: the expired come first
        for job in [j for j in self.jobs.values() if j.worker and j.gateway and now > j.deadline]:
            gateway = job.gateway
            self._cancel(job)  # the worker confirms, freeing the slot
            self._send(gateway, wire.GATEWAY, msgs.Fail(
                job_id=job.submit.job_id, code=msgs.ErrorCode.DEADLINE,
                error="the request's deadline passed while it ran"))
        live = set().union(*(w.names for w in self.workers.values()))
        self.know(live, now)
        for model in [m for m, seen in self.known_models.items() if now - seen > MODEL_MEMORY]:
            del self.known_models[model]
        for model in [m for m, q in self.queues.items() if not q and m not in live]:
            del self.queues[model]
        for model, queue in list(self.queues.items()):
            for job_id in list(queue):
                job = self.jobs[job_id]
                if now > job.deadline:
                    fail = msgs.Fail(job_id=job_id, code=msgs.ErrorCode.DEADLINE,
                                     error="the request's deadline passed while it waited")
                elif model not in live and now - job.enqueued > self.settings.grace:
                    fail = msgs.Fail(job_id=job_id, code=msgs.ErrorCode.NO_WORKER, retryable=True,
                                     error=f"no worker for '{model}' is up; it may be restarting")
                else:
                    continue
                self._end(job, fail.code, fail)
        self.ambiguous = tiers.warn_ambiguous(self.workers.values(), self.ambiguous)
        beat = msgs.Heartbeat(session=self.session)
        self._out += [(w, wire.WORKER, beat) for w in self.workers]
        self._out += [(g, wire.GATEWAY, beat) for g in self.gateways]
        return self._sent(now)

    def clear(self) -> None:
        """Forget every worker, gateway and job (this broker stepped down; the new
        coordinator hears from them all again)."""
        self.workers.clear()
        self.gateways.clear()
        self.jobs.clear()
        self.queues.clear()

    def models(self) -> list[ModelEntry]:
        """Every name a request may use, with the model it resolves to (broker/tiers.py)."""
        return tiers.entries(self.workers.values(), self.queues)

    # ----------------------------------------------------------------- steps

    def _sent(self, now: float) -> list[Send]:
        """End a transition: dispatch what fits, hand over the messages."""
        self._dispatch(now)
        out, self._out = self._out, []
        return out

    def _send(self, identity: bytes, protocol: bytes, msg: msgs.Message) -> None:
        self._out.append((identity, protocol, msg))

    def reject(self, reason: str, detail: object) -> None:
        """Count and drop a message the broker will not act on."""
        self.rejected[reason] += 1
        self.counters["dropped"] += 1
        log_event(log, "frame_dropped", logging.DEBUG, reason=reason, detail=detail)

    def _register(self, identity: bytes, ready: msgs.Ready, now: float) -> None:
        if not (ready.model_id and 1 <= ready.slots <= MAX_SLOTS):
            self.reject("bad_ready", "READY without a model or with slots out of range")
            log_event(log, "ready_refused", logging.WARNING, worker=ready.worker_id[:80],
                      model=ready.model_id[:80], slots=ready.slots)
            return
        # A worker that registers again has abandoned whatever it was running.
        for other in list(self.workers.values()):
            if other.info.worker_id == ready.worker_id or other.identity == identity:
                self._purge_worker(other, "registered again")
        worker = WorkerState(
            identity=identity, info=ready, expires=now + self.settings.peer_timeout,
            load=ready.load, last_seen=now)
        self.workers[identity] = worker
        self.know(worker.names, now)
        log_event(log, "worker_ready", worker=ready.worker_id, node=ready.node_id,
                  model=ready.model_id, tiers=",".join(ready.tiers), slots=ready.slots,
                  engine=ready.engine)
        self.ambiguous = tiers.warn_ambiguous(self.workers.values(), self.ambiguous)

    def _job_of(self, worker: WorkerState, dispatch_id: str) -> JobState | None:
        """The job of a dispatch id if it is this worker's current attempt; anything stale
        or foreign is ignored."""
        job = self.jobs.get(dispatch_id.rpartition("/")[0])
        if job is None or job.worker != worker.identity or job.dispatch_id != dispatch_id:
            return None
        return job

    def _purge_worker(self, worker: WorkerState, reason: str) -> None:
        """A worker left or went silent: it is forgotten and its jobs are lost."""
        del self.workers[worker.identity]
        self.counters["workers_purged"] += 1
        level = logging.INFO if reason == "disconnected" else logging.WARNING
        log_event(log, "worker_purged", level, worker=worker.info.worker_id,
                  node=worker.info.node_id, reason=reason, jobs=len(worker.running))
        for job_id in list(worker.running):
            self._lose(self.jobs[job_id], f"worker {worker.info.worker_id} lost ({reason})")
        for dispatch_id, done in list(self.released.items()):
            if done.worker == worker.identity:
                del self.released[dispatch_id]
                self._send(done.gateway, wire.GATEWAY, lost(
                    dispatch_id, f"worker {worker.info.worker_id} lost ({reason})"))

    def _purge_gateway(self, gateway: bytes, silent: bool) -> None:
        """A gateway left or went silent: it is forgotten and its jobs are cancelled. A
        silent one with jobs is told they were dropped (now, and when it next speaks)."""
        jobs = [j for j in self.jobs.values() if j.gateway == gateway]
        for job in jobs:
            self._cancel(job)
        dropped = silent and bool(jobs)
        self.gateways.remove(gateway, dropped)
        if dropped:
            self._send(gateway, wire.GATEWAY, msgs.Disconnect(reason=msgs.Reason.JOBS_DROPPED))

    def _lose(self, job: JobState, reason: str) -> None:
        """A job's worker is gone (or gave it up): run it again if nothing reached the
        client yet, else end it for its gateway to resume with what the client has seen."""
        if job.streamed or job.retries >= self.settings.max_retries or job.gateway is None:
            self._end(job, "worker_lost", lost(job.submit.job_id, reason))
            return
        self._release(job)
        job.retries += 1
        self.counters["redispatched"] += 1
        log_event(log, "job_redispatched", request=job.submit.request_id, job=job.submit.job_id,
                  reason=reason)
        self.queues[job.submit.model].appendleft(job.submit.job_id)

    def know(self, names: Iterable[str], now: float) -> None:
        """Remember ``names`` as served at ``now``, within :data:`MAX_MODELS`: a request for
        one waits the grace period for a worker rather than a 404."""
        for name in names:
            self.known_models[name] = now
        while len(self.known_models) > MAX_MODELS:
            del self.known_models[min(self.known_models, key=self.known_models.__getitem__)]

    def _cancel(self, job: JobState) -> None:
        """Nobody listens to the job any more: a queued one ends now, a running one when
        its worker confirms (its FAIL frees the slot)."""
        self.counters["cancelled"] += 1
        job.gateway = None
        if job.worker is None:
            self._end(job, "cancelled")
        else:
            self._send(job.worker, wire.WORKER, msgs.Cancel(job_id=job.dispatch_id))

    def _dispatch(self, now: float) -> None:
        """Give waiting jobs to free workers, oldest queue heads first, until none fits."""
        progress = True
        while progress:
            progress = False
            for model, queue in self.queues.items():
                if not queue:
                    continue
                job = self.jobs[queue[0]]
                candidates = tiers.candidates(model, self.workers.values())
                worker, scored = self.chooser.choose(candidates, job.submit)
                if worker is None:
                    continue
                queue.popleft()
                self._start(job, worker, scored, now)
                progress = True

    def _start(self, job: JobState, worker: WorkerState,
               scored: list[tuple[WorkerState, float, int]], now: float) -> None:
        submit = job.submit
        job.worker = worker.identity
        job.dispatch_id = f"{submit.job_id}/{job.retries}"
        worker.running.add(submit.job_id)
        # Its prompt cache will hold the job's prompt once the job ends; recorded now, as the
        # next turn may come before the RELEASE (the gateway has the FINAL from the worker).
        worker.prefixes.add(submit.prefix_hashes, submit.job_id)
        first = job.route is None
        route = job.route_to(worker, scored, now, now + self.wall_offset)
        if first:
            self.routes.append(route)
        log_event(log, "job_dispatched", logging.DEBUG, request=submit.request_id,
                  job=job.dispatch_id, worker=worker.info.worker_id)
        # The worker answers the gateway itself (its ACCEPTED), by the job's way.
        self._send(worker.identity, wire.WORKER, msgs.Job(
            job_id=job.dispatch_id, request_id=submit.request_id, request=submit.request,
            resume_token_ids=submit.resume_token_ids, resume_text=submit.resume_text,
            reply_to=reply_to(submit, worker.info.node_id)))

    def _release(self, job: JobState) -> None:
        """The job leaves its worker's slot (if it held one)."""
        if job.worker is not None and job.worker in self.workers:
            self.workers[job.worker].running.discard(job.submit.job_id)
        job.worker = None

    def _end(self, job: JobState, outcome: str, msg: msgs.Fail | None = None) -> None:
        """The job is over: it leaves its slot, its gateway gets ``msg`` if it still
        listens (none after a RELEASE: the FINAL went to the gateway by the job's way),
        the table forgets it and the route log records ``outcome`` (``cancelled`` when
        nobody listened). A worker's FAIL keeps its dispatch id, the broker's own FAIL
        has the job id."""
        self._release(job)
        if job.gateway is None:
            outcome = "cancelled"
        elif msg is not None:
            self._send(job.gateway, wire.GATEWAY, msg)
        self.jobs.pop(job.submit.job_id, None)
        queue = self.queues.get(job.submit.model)
        if queue and job.submit.job_id in queue:
            queue.remove(job.submit.job_id)
        if job.route is not None:
            job.route.outcome = outcome

