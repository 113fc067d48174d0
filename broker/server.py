"""The broker: one ROUTER socket, workers and gateways on it, jobs between them.

The loop (zguide's Majordomo broker, with the gaps closed):

    poll the ROUTER for up to one heartbeat interval
    decode each message, check its sender's role, hand it to the job table
    (:mod:`broker.jobs`, no I/O), send what the table returns
    every interval: heartbeat every peer, purge the silent ones, expire waiting jobs

This module keeps the sockets, the roles, the peers and the election; what happens to
workers, gateways and jobs is decided in :class:`broker.jobs.JobTable`, and CONTROL
questions are answered by :mod:`broker.control` from a :meth:`Broker.snapshot`.

Several brokers (one per node) elect one coordinator (:mod:`broker.election`) from the
ANNOUNCEs they send each other every interval. A standby broker serves nobody: it answers
every worker and gateway with REDIRECT to the coordinator (or, while none is known,
with a heartbeat, and with DISCONNECT once it becomes the coordinator itself, so that
they register and resubmit here). A coordinator that steps down redirects everyone.

Hostile input: every frame is validated (:func:`common.wire.decode`), then checked
against its sender's role (a worker speaks only the worker protocol...); refusals are
counted by reason (``rejected`` in the status). A handler that still fails is logged and
counted (``handler_error``), never allowed to stop the loop that serves everyone."""

from __future__ import annotations

import itertools
import logging
import time
import uuid

import zmq

from mlx_stack.broker import announce, control, epochs
from mlx_stack.broker.election import BrokerInfo, Election
from mlx_stack.broker.jobs import JobTable, Send
from mlx_stack.broker.peers import PeerLinks
from mlx_stack.broker.skew import Skew
from mlx_stack.common import messages as msgs
from mlx_stack.common import versions, wire
from mlx_stack.common.config import Settings, is_loopback
from mlx_stack.common.discovery import Advert, Discovery
from mlx_stack.common.logs import log_event
from mlx_stack.common.meshkeys import MeshSecretError, load_keys
from mlx_stack.common.plain import ProtocolError
from mlx_stack.common.status import COORDINATOR, STANDBY, BrokerStatus
from mlx_stack.common.transport import (
    admit_members,
    configure,
    drain,
    refused_peers,
    watch_refusals,
)

log = logging.getLogger("broker")


class Broker:
    """Routes jobs from gateways to workers. Single-threaded; call :meth:`run`."""

    def __init__(self, settings: Settings, ctx: zmq.Context | None = None) -> None:
        self.settings = settings
        self.ctx = ctx or zmq.Context.instance()
        self.started = time.time()
        self.session = uuid.uuid4().hex
        self.table = JobTable(settings, self.session, time.time() - time.monotonic())
        """Workers, gateways, jobs, and the counters (the loop's too)."""
        # This node's workers are loading: a request for their models waits for them.
        self.table.know(settings.expected_models, time.monotonic())
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
        others = [e for e in settings.peer_list if e != self.advertise]
        self.election = Election(
            BrokerInfo(node_id=settings.node_id, endpoint=self.advertise,
                       priority=settings.priority, started=self.started,
                       epoch=epochs.load(settings.home, settings.broker_port)),
            timeout=settings.peer_timeout, hold_down=settings.hold_down,
            # Alone, there is nobody to listen for: coordinate at once.
            now=time.monotonic() - (0 if others or settings.mdns_interfaces
                                    else settings.peer_timeout))
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.refusals = watch_refusals(self.socket)
        self.poller.register(self.refusals, zmq.POLLIN)
        self.peers = PeerLinks(self.ctx, settings, self.keys, self.advertise, self.poller,
                               Discovery(Advert(
                                   mesh=self.keys.mesh_id if self.keys else settings.mesh_id,
                                   node_id=settings.node_id, endpoint=self.advertise,
                                   priority=settings.priority, started=self.started),
                                   settings.mdns_interfaces)
                               if settings.mdns_interfaces else None)
        self.coordinator = ""  # the coordinator this standby follows ("": none known)
        self.followers: dict[bytes, bytes] = {}
        """Workers and gateways heard while standby (identity -> protocol tag)."""
        self.mesh_models: list[str] = []
        """The models the coordinator last announced: known here if this one takes over."""
        self.skew = Skew(settings.node_id, settings.peer_timeout)  # broker/skew.py
        self._seq = itertools.count(1)
        self._stopping = False
        self._saved_epoch = -1
        self.election.decide(time.monotonic())
        self._save_epoch()

    def _announcement(self) -> msgs.Announce:
        return announce.announcement(self.election, self.epoch, next(self._seq),
                                     self.table.known_models)

    def _heard(self, msg: msgs.Announce) -> None:
        if msg.endpoint in self.peers.removed:
            return
        before, now = self.election.peers.get(msg.endpoint), time.monotonic()
        if not self.election.heard(announce.info(msg), now):
            return
        if msg.coordinator:
            self.mesh_models = msg.models
        elif self.coordinating:  # a standby's node expects these: wait for its workers
            self.table.know(msg.models, now)
        if msg.coordinator != (before is not None and before.coordinator):
            # A coordinator appeared or stepped down: redirect our followers now, not at
            # the next tick (up to one interval that every stream of this node waits).
            self._elect(now)

    def _on_peer_reply(self, frames: list[bytes]) -> None:
        """An announcement a peer sent back on our own link to it."""
        try:
            _, msg = wire.decode(frames, wire.FROM_BROKER)
        except ProtocolError as exc:
            if not self._stranger(frames):
                self.table.reject(exc.reason, exc)
            return
        if isinstance(msg, msgs.Announce) and self._plausible(msg):
            self._heard(msg)

    def add_peer(self, endpoint: str) -> bool:
        """``mlx-stack mesh add``: announce to the peer (again)."""
        self.peers.restore(endpoint)
        return True

    def remove_peer(self, endpoint: str) -> bool:
        """Stop announcing to the peer and forget it; whether it was known at all."""
        known = self.peers.remove(endpoint) or endpoint in self.election.peers
        self.election.lost(endpoint)
        self._elect(time.monotonic())
        return known

    @property
    def epoch(self) -> int:
        return self.election.max_epoch

    @property
    def coordinating(self) -> bool:
        return self.election.me.coordinator

    def alias(self, now: float) -> bool:
        """Whether this broker should publish mlx-stack.local (broker/skew.py)."""
        return self.coordinating and not self.skew.yields_alias(now)

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
                for frames in drain(self.socket):
                    self._on_frames(frames)
            if self.refusals in ready:
                self._count_refusals()
            replies, lost = self.peers.receive(ready)
            for frames in replies:
                self._on_peer_reply(frames)
            for endpoint in lost:  # its process died: re-elect now, not after the timeout
                self.election.lost(endpoint)
            now = time.monotonic()
            if lost:
                self._elect(now)
            if now >= next_tick:
                self._tick(now)
                next_tick = now + interval
        for identity, protocol in [*((w, wire.WORKER) for w in self.table.workers),
                                   *((g, wire.GATEWAY) for g in self.table.gateways)]:
            self._send(identity, protocol, msgs.Disconnect(reason=msgs.Reason.LEAVING))
        self.peers.close()
        self.socket.disable_monitor()
        self.refusals.close(linger=0)
        self.socket.close(linger=100)
        if self.auth is not None:
            self.auth.stop()

    def stop(self) -> None:
        self._stopping = True

    def _count_refusals(self) -> None:
        for peer in refused_peers(self.refusals):
            self.table.counters["handshake_refused"] += 1
            log_event(log, "connection_refused", logging.INFO, peer=peer,
                      reason="no mesh secret, a foreign one, or not a member")

    def _on_frames(self, frames: list[bytes]) -> None:
        """Validate one message from the ROUTER, then act on it; never raises."""
        if len(frames) < 2:
            self.table.reject("frame_count", f"{len(frames)} frames")
            return
        identity = frames[0]
        try:
            protocol, msg = wire.decode(frames[1:], wire.TO_BROKER)
        except ProtocolError as exc:
            if self._stranger(frames[1:]):
                # Tell it our version: it may only reach us on this connection.
                self._send(identity, wire.PEER, self._announcement())
                return
            self.table.reject(exc.reason, exc)
            if (advice := self.skew.local(frames[1])) is not None:
                log_event(log, "incompatible_peer", logging.WARNING, fix=advice)
            if (job_id := wire.submitted_job(frames[1:])) is not None:
                self._send(identity, wire.GATEWAY, msgs.Fail(
                    job_id=job_id, code=msgs.ErrorCode.INVALID_REQUEST,
                    error=f"the broker cannot read this request: {exc}"))
            return
        role = self._role_of(identity)
        if role is not None and role != protocol:
            self.table.reject("wrong_role", f"{msg.COMMAND.name} on {protocol.decode()} "
                              f"from a {role.decode()} peer")
            return
        try:
            self._on_message(identity, protocol, msg)
        except Exception as exc:  # a bug must not take the whole mesh's broker down
            self.table.rejected["handler_error"] += 1
            log.exception("handler_error command=%s error=%r", msg.COMMAND.name, exc)

    def _stranger(self, frames: list[bytes]) -> bool:
        """Whether ``frames`` are a broker's ANNOUNCE of another protocol version: noted
        for the status (broker/skew.py), warned of once with what to upgrade."""
        hello = versions.hello(frames)
        if hello is None:
            return False
        self.table.rejected["incompatible_protocol"] += 1
        if (advice := self.skew.heard(hello, time.monotonic())) is not None:
            log_event(log, "incompatible_peer", logging.WARNING, node=hello.node_id,
                      endpoint=hello.endpoint, protocol=hello.protocol, fix=advice)
        return True

    def _role_of(self, identity: bytes) -> bytes | None:
        """The protocol tag an identity has spoken so far (None if new)."""
        if identity in self.table.workers:
            return wire.WORKER
        if identity in self.table.gateways:
            return wire.GATEWAY
        return self.followers.get(identity)

    def _plausible(self, msg: msgs.Announce) -> bool:
        """Whether to believe an ANNOUNCE (:func:`broker.announce.doubt`)."""
        doubt = announce.doubt(msg)
        if doubt is not None:
            self.table.reject("bad_announce", doubt)
        return doubt is None

    def _on_message(self, identity: bytes, protocol: bytes, msg: msgs.Message) -> None:
        if isinstance(msg, msgs.Announce):
            if not self._plausible(msg):
                return
            self._heard(msg)
            # Answer on this connection: our own socket to that broker may still be in
            # reconnect backoff, and a broker that just started must learn of us now.
            self._send(identity, wire.PEER, self._announcement())
        elif not self.coordinating:
            self._on_standby(identity, protocol, msg)
        elif protocol == wire.WORKER:
            self._apply(self.table.worker_message(identity, msg, time.monotonic()))
        else:
            self._on_gateway(identity, msg)

    def _on_standby(self, identity: bytes, protocol: bytes, msg: msgs.Message) -> None:
        """Serve nobody: point the sender at the coordinator, or ask it to wait."""
        if isinstance(msg, msgs.Control):
            self._send(identity, protocol, control.answer(msg, self.snapshot(), self))
            return
        self.followers[identity] = protocol
        if self.coordinator:
            self._send(identity, protocol, msgs.Redirect(endpoint=self.coordinator))
        else:
            self._send(identity, protocol, msgs.Heartbeat(session=self.session))

    def _on_gateway(self, identity: bytes, msg: msgs.Message) -> None:
        self._apply(self.table.gateway_message(identity, msg, time.monotonic()))
        if isinstance(msg, msgs.Control):
            self._send(identity, wire.GATEWAY, control.answer(msg, self.snapshot(), self))

    def snapshot(self) -> control.Snapshot:
        """The broker as CONTROL reads it, now."""
        now, table = time.monotonic(), self.table
        return control.Snapshot(routes=list(table.routes), status=BrokerStatus(
            node_id=self.settings.node_id, endpoint=self.advertise,
            role=COORDINATOR if self.coordinating else STANDBY,
            coordinator=self.advertise if self.coordinating else self.coordinator,
            epoch=self.epoch, priority=self.settings.priority,
            peers=self.election.status(now), incompatible=self.skew.status(now),
            alias=self.alias(now), uptime_s=round(time.time() - self.started, 1),
            workers=[w.status(now) for w in table.workers.values()],
            queues={m: len(q) for m, q in table.queues.items() if q},
            known_models=sorted({*table.known_models, *self.mesh_models}),
            jobs=len(table.jobs), gateways=len(table.gateways), counters=dict(table.counters),
            rejected=dict(table.rejected), models=table.models()))

    # ----------------------------------------------------------------- timers

    def _tick(self, now: float) -> None:
        self._elect(now)
        self._apply(self.table.tick(now))

    def _announce(self) -> None:
        if unsent := self.peers.announce(wire.encode(wire.PEER, self._announcement())):
            self.table.counters["announce_unsent"] += unsent

    def _elect(self, now: float) -> None:
        """Announce ourselves, then act on the election's verdict (and announce a new
        role at once: the standbys redirect their workers and gateways when they hear it)."""
        self._announce()
        decision = self.election.decide(now)
        self._save_epoch()
        if decision.changed:
            self._announce()
        self.peers.set_coordinator(self.alias(now))
        coordinator = decision.follow.endpoint if decision.follow else ""
        if decision.changed:
            log_event(log, "role_changed", logging.WARNING,
                      role=COORDINATOR if decision.coordinator else STANDBY,
                      epoch=self.epoch, coordinator=coordinator or self.endpoint)
        if decision.changed and decision.coordinator:
            self.table.know(self.mesh_models, now)
            # Those that waited on us as standby register and resubmit here now.
            for identity, protocol in self.followers.items():
                self._send(identity, protocol, msgs.Disconnect(reason=msgs.Reason.COORDINATING))
            self.followers.clear()
        elif decision.changed:
            self._hand_over(coordinator)
        elif coordinator and coordinator != self.coordinator:
            for identity, protocol in self.followers.items():
                self._send(identity, protocol, msgs.Redirect(endpoint=coordinator))
        self.coordinator = coordinator

    def _save_epoch(self) -> None:
        if self.epoch != self._saved_epoch:
            epochs.save(self.settings.home, self.settings.broker_port, self.epoch)
            self._saved_epoch = self.epoch

    def _hand_over(self, coordinator: str) -> None:
        """Step down: send every worker and gateway to the new coordinator. Gateways
        resubmit their open jobs there with what their clients have seen."""
        reply: msgs.Message = (msgs.Redirect(endpoint=coordinator) if coordinator
                               else msgs.Disconnect(reason=msgs.Reason.STEPPED_DOWN))
        for identity in list(self.table.workers):
            self._send(identity, wire.WORKER, reply)
            self.followers[identity] = wire.WORKER
        for identity in list(self.table.gateways):
            self._send(identity, wire.GATEWAY, reply)
            self.followers[identity] = wire.GATEWAY
        self.table.clear()

    # ----------------------------------------------------------------- sending

    def _apply(self, sends: list[Send]) -> None:
        """Send what a job table transition produced."""
        for identity, protocol, msg in sends:
            self._send(identity, protocol, msg)

    def _send(self, identity: bytes, protocol: bytes, msg: msgs.Message) -> None:
        msg.epoch = self.epoch
        try:
            self.socket.send_multipart([identity, *wire.encode(protocol, msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: gone; EAGAIN: not keeping up
            self.table.counters["send_failed"] += 1
            log_event(log, "send_failed", logging.DEBUG, error=exc.strerror)

