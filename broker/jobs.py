"""The job table: workers, their jobs, the per-model queues and the route log. No I/O.

Every transition (a worker registers, reports, streams, ends or is lost; a gateway
submits, cancels or goes away; the clock passes a deadline) changes the table and returns
the messages to send as ``(identity, protocol tag, message)``. Waiting jobs are given to
free workers once, at the end of each transition. The broker's loop decodes frames,
checks who sent them and sends what the table returns (:mod:`broker.server`), so
everything here is tested without sockets (tests/test_jobs.py).

A worker is purged when nothing has come from it for ``liveness`` intervals, busy or not
(its I/O thread heartbeats during inference). Its jobs that have sent nothing yet go back
to the head of their queue; jobs that have streamed output are failed as retryable so
that the gateway, which knows what the client has seen, resumes them elsewhere.

Each dispatch of a job to a worker has its own id, ``<job id>/<attempt>``: frames of an
earlier attempt (a worker that was purged but was only slow) never pass for the current.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable

from broker import tiers
from broker.routing import Chooser
from broker.state import JobState, WorkerState
from common import protocol as p
from common.config import Settings, is_loopback
from common.logs import log_event
from common.status import Candidate, ModelEntry, Route

log = logging.getLogger("broker")

ROUTE_HISTORY = 1000
MAX_SLOTS = 1024
MODEL_MEMORY = 600.0
"""Seconds a model name is still known (a request for it waits the grace period rather
than a 404) after its last worker left."""
MAX_MODELS = 1024
"""Most model names remembered: a flood of names (resubmissions name any model) evicts
the longest unserved, never grows memory."""

Send = tuple[bytes, bytes, p.Message]
"""A message to send: (ROUTER identity, protocol tag, message)."""


def reply_to(submit: p.Submit, worker_node: str) -> str:
    """The gateway's stream endpoint for a worker on ``worker_node``, if it can reach it:
    a loopback endpoint only from the gateway's own node (elsewhere it would name the
    worker's own machine)."""
    host = submit.reply_to.removeprefix("tcp://").rpartition(":")[0]
    if not host or (is_loopback(host) and worker_node != submit.node_id):
        return ""
    return submit.reply_to


class JobTable:
    """What the coordinator knows of workers and jobs, and how each event changes it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: dict[bytes, WorkerState] = {}
        self.jobs: dict[str, JobState] = {}
        self.queues: dict[str, collections.deque[str]] = collections.defaultdict(
            collections.deque)
        self.known_models: dict[str, float] = {}
        """Model names served lately, with when a live worker last had them."""
        self.routes: collections.deque[Route] = collections.deque(maxlen=ROUTE_HISTORY)
        self.counters: collections.Counter[str] = collections.Counter()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.chooser = Chooser(settings.cache_routing)
        self.ambiguous: set[str] = set()
        """Names that workers of several models serve, already warned of."""
        self._out: list[Send] = []

    # ----------------------------------------------------------------- transitions

    def worker_message(self, identity: bytes, msg: p.Message, now: float) -> list[Send]:
        """Anything a worker sends (READY, HEARTBEAT, PARTIAL, FINAL, FAIL, DISCONNECT)."""
        if isinstance(msg, p.Ready):
            self._register(identity, msg, now)
            return self._sent()
        worker = self.workers.get(identity)
        if worker is None:
            # Not registered (purged, or the broker restarted): ask it to register again.
            self._reject("unregistered", f"{msg.COMMAND.name} from an unregistered worker")
            if not isinstance(msg, p.Disconnect):
                self._send(identity, p.WORKER, p.Disconnect(reason=p.Reason.UNKNOWN))
            return self._sent()
        worker.expires = now + self.settings.peer_timeout
        worker.last_seen = now
        match msg:
            case p.Heartbeat():
                worker.mem_free, worker.reported_running = msg.mem_free, msg.running
                worker.tokens_per_s, worker.counters = msg.tokens_per_s, msg.counters
                worker.kv_bytes = msg.kv_bytes
                for dispatch_id in msg.streamed:
                    if (job := self._job_of(worker, dispatch_id)) is not None:
                        job.streamed = True
            case p.Partial():
                job = self._job_of(worker, msg.job_id)
                if job is not None:
                    # The "started" PARTIAL carries no output: the client has seen nothing,
                    # and the job may still run again elsewhere unseen.
                    job.streamed = job.streamed or msg.has_output
                    if job.gateway is not None:
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
                else:
                    self._finish(job, msg, "failed")
            case p.Disconnect():
                self._purge_worker(worker, "disconnected")
        return self._sent()

    def submit(self, gateway: bytes, submit: p.Submit, now: float) -> list[Send]:
        """A gateway's SUBMIT: queue it, or refuse it at once (404, 429, a job id in use).
        One that does not decode is refused before it gets here (broker/server.py)."""
        def refuse(code: p.ErrorCode, error: str, retryable: bool = False) -> list[Send]:
            self.counters[f"rejected_{code}"] += 1
            self._send(gateway, p.GATEWAY, p.Fail(
                job_id=submit.job_id, error=error, code=code, retryable=retryable))
            return self._sent()

        if submit.job_id in self.jobs:
            return refuse(p.ErrorCode.INVALID_REQUEST, f"job id {submit.job_id} is in use")
        if submit.attempt and submit.model not in self.known_models:
            # Admitted before under another coordinator: its workers are on their way.
            self.know([submit.model], now)
        if submit.model not in self.known_models:
            return refuse(p.ErrorCode.MODEL_NOT_FOUND,
                          f"The model '{submit.model}' does not exist in this mesh. "
                          f"Available: {', '.join(sorted(self.known_models)) or 'none yet'}.")
        queue = self.queues[submit.model]
        if len(queue) >= self.settings.queue_size and not submit.attempt:
            return refuse(p.ErrorCode.QUEUE_FULL,
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
        return self._sent()

    def cancel(self, gateway: bytes, job_id: str) -> list[Send]:
        """The gateway's client went away: stop the job (its worker confirms with a FAIL,
        which frees the slot)."""
        self._cancel(gateway, job_id)
        return self._sent()

    def gateway_lost(self, gateway: bytes) -> list[Send]:
        """Cancel every job of a gateway that left or went silent."""
        for job in [j for j in self.jobs.values() if j.gateway == gateway]:
            self._cancel(gateway, job.submit.job_id)
        return self._sent()

    def tick(self, now: float) -> list[Send]:
        """Purge silent workers; fail jobs past their deadline (cancelling any that run)
        and queued jobs that waited longer than the grace period for a model with no live
        worker at all."""
        for worker in [w for w in self.workers.values() if w.expires < now]:
            self._purge_worker(worker, "heartbeat timeout")
        for job in [j for j in self.jobs.values() if j.worker and j.gateway and now > j.deadline]:
            gateway = job.gateway
            self._cancel(gateway, job.submit.job_id)  # the worker confirms, freeing the slot
            self._send(gateway, p.GATEWAY, p.Fail(
                job_id=job.submit.job_id, code=p.ErrorCode.DEADLINE,
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
                    fail = p.Fail(job_id=job_id, code=p.ErrorCode.DEADLINE,
                                  error="the request's deadline passed while it waited")
                elif model not in live and now - job.enqueued > self.settings.grace:
                    fail = p.Fail(job_id=job_id, code=p.ErrorCode.NO_WORKER, retryable=True,
                                  error=f"no worker for '{model}' is up; it may be restarting")
                else:
                    continue
                self._finish(job, fail, fail.code)
        self._warn_ambiguous()
        return self._sent()

    def clear(self) -> None:
        """Forget every worker and job (this broker stepped down; the new coordinator
        hears from them all again)."""
        self.workers.clear()
        self.jobs.clear()
        self.queues.clear()

    def models(self) -> list[ModelEntry]:
        """Every name a request may use, with the model it resolves to (broker/tiers.py)."""
        return tiers.entries(self.workers.values(), self.queues)

    # ----------------------------------------------------------------- steps

    def _sent(self) -> list[Send]:
        """End a transition: dispatch what fits, hand over the messages."""
        self._dispatch()
        out, self._out = self._out, []
        return out

    def _send(self, identity: bytes, protocol: bytes, msg: p.Message) -> None:
        self._out.append((identity, protocol, msg))

    def _reject(self, reason: str, detail: object) -> None:
        self.rejected[reason] += 1
        self.counters["dropped"] += 1
        log_event(log, "frame_dropped", logging.DEBUG, reason=reason, detail=detail)

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
        self.know(worker.names, now)
        log_event(log, "worker_ready", worker=ready.worker_id, node=ready.node_id,
                  model=ready.model_id, tiers=",".join(ready.tiers), slots=ready.slots,
                  engine=ready.engine)
        self._warn_ambiguous()

    def _warn_ambiguous(self) -> None:
        """Warn once of each name that workers of several models serve (until it is no
        longer ambiguous): only one of them gets its requests, and the user should
        give the others another tier."""
        found = {e.id: e for e in tiers.entries(self.workers.values()) if e.ambiguous}
        for name in found.keys() - self.ambiguous:
            entry = found[name]
            log_event(log, "name_ambiguous", logging.WARNING, name=name,
                      models=",".join(entry.ambiguous), routed_to=entry.model_id,
                      fix=f"give one of them another tier: --model SPEC=TIER on its node "
                      f"(or serve in its config.toml's [models]), so '{name}' names one model")
        self.ambiguous = set(found)

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
                  node=worker.info.node_id, reason=reason, jobs=len(worker.running))
        for job_id in list(worker.running):
            self._lose(self.jobs[job_id], f"worker {worker.info.worker_id} lost ({reason})")

    def _lose(self, job: JobState, reason: str) -> None:
        """A job's worker is gone (or gave it up): run it again if nothing reached the
        client yet, else tell the gateway to resume it with what the client has seen."""
        self._release(job)
        if job.streamed or job.retries >= self.settings.max_retries or job.gateway is None:
            self._finish(job, p.Fail(
                job_id=job.submit.job_id, code=p.ErrorCode.WORKER_LOST, retryable=True,
                error=f"{reason}; resubmit with what the client has seen as resume tokens"),
                "worker_lost")
            return
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

    def _dispatch(self) -> None:
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
                self._start(job, worker, scored)
                progress = True

    def _start(self, job: JobState, worker: WorkerState,
               scored: list[tuple[WorkerState, float, int]]) -> None:
        submit = job.submit
        job.worker = worker.identity
        job.dispatch_id = f"{submit.job_id}/{job.retries}"
        worker.running.add(submit.job_id)
        # Its prompt cache will hold the job's prompt once the job ends. Recorded now, not
        # at the FINAL: the client may send the next turn before the copy of the FINAL
        # that reaches the broker (the gateway gets its own straight from the worker).
        worker.prefixes.add(submit.prefix_hashes, submit.job_id)
        if job.route is None:
            job.route = Route(job_id=submit.job_id, request_id=submit.request_id,
                              model=submit.model, time=time.time())
            self.routes.append(job.route)
        route = job.route
        route.retries = job.retries
        route.candidates = [Candidate(worker_id=w.info.worker_id, node_id=w.info.node_id,
                                      score=round(s, 4), cached=c) for w, s, c in scored]
        route.worker_id, route.node_id = worker.info.worker_id, worker.info.node_id
        route.queue_wait_ms = round((time.monotonic() - job.enqueued) * 1000, 2)
        log_event(log, "job_dispatched", logging.DEBUG, request=submit.request_id,
                  job=job.dispatch_id, worker=worker.info.worker_id)
        # The JOB first: it is on the way to the first token. The worker's direct frames
        # may still overtake the ACCEPTED; the gateway holds them until it comes.
        self._send(worker.identity, p.WORKER, p.Job(
            job_id=job.dispatch_id, request_id=submit.request_id, request=submit.request,
            resume_token_ids=submit.resume_token_ids, resume_text=submit.resume_text,
            reply_to=reply_to(submit, worker.info.node_id)))
        if job.gateway is not None:
            self._send(job.gateway, p.GATEWAY, p.Accepted(
                job_id=job.dispatch_id, node_id=worker.info.node_id,
                worker_id=worker.info.worker_id, model_id=worker.info.model_id))

    def _release(self, job: JobState) -> None:
        if job.worker is not None and job.worker in self.workers:
            self.workers[job.worker].running.discard(job.submit.job_id)
        job.worker = None

    def _finish(self, job: JobState, msg: p.Final | p.Fail, outcome: str) -> None:
        """End a job: tell its gateway, free its slot, record the outcome. A worker's
        FINAL or FAIL keeps its dispatch id, the broker's own FAIL has the job id."""
        self._release(job)
        if job.gateway is not None:
            self._send(job.gateway, p.GATEWAY, msg)
        self._forget(job, outcome if job.gateway is not None else "cancelled")

    def _forget(self, job: JobState, outcome: str) -> None:
        self.jobs.pop(job.submit.job_id, None)
        queue = self.queues.get(job.submit.model)
        if queue and job.submit.job_id in queue:
            queue.remove(job.submit.job_id)
        if job.route is not None:
            job.route.outcome = outcome
