"""ZeroMQ socket set-up shared by every role, so each socket in the mesh behaves alike.

Why each option:
- ``LINGER`` small: a closing process must not hang on unsent frames to a dead peer.
- ``ROUTER_MANDATORY``: sending to a vanished peer raises ``EHOSTUNREACH`` instead of
  dropping the frame silently, so the broker learns of the loss at once.
- ZMTP heartbeats: a second line of liveness below ours; a frozen peer's connection is
  closed after the timeout (without them libzmq notices nothing for a long time).
- ``MAXMSGSIZE``: an oversize frame closes the connection before it is ever buffered.
- Reconnect interval with a cap: capped exponential backoff when a peer is away.
- High water marks raised: a token stream is many small frames; the default of 1000 could
  block or drop a burst.
- CURVE when the mesh has a secret (common/meshkeys.py): ROUTER sockets are the mesh's
  servers (only they bind), every other socket is a client of one. A ZAP handler in the
  binding process admits only clients that present the mesh's own public key.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from mlx_stack.common.config import Settings
from mlx_stack.common.logs import log_event
from mlx_stack.common.meshkeys import MeshKeys
from mlx_stack.common.messages import Message
from mlx_stack.common.plain import ProtocolError
from mlx_stack.common.wire import MAX_BODY_BYTES, Allowed, decode

HWM = 100_000
DRAIN = 1000
"""Messages read per wake-up, so that a role's timers and other work still run under load."""
_EVENTS, _POLLIN = zmq.EVENTS, int(zmq.POLLIN)


def waiting(sock: zmq.Socket) -> bool:
    """Whether a message waits on ``sock``, without reading it; asking also re-arms the
    socket's descriptor (``ZMQ_EVENTS``).

    Plain integers on purpose: ``sock.EVENTS & zmq.POLLIN`` builds enum flags, and at once
    per frame that was a fifth of the gateway's CPU for a token (py-spy, 2-vCPU VM)."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def configure(sock: zmq.Socket, settings: Settings, keys: MeshKeys | None) -> zmq.Socket:
    """Apply the mesh-wide options to a fresh socket (before it binds or connects) and
    return it; with ``keys``, the socket speaks CURVE with the mesh's key pair."""
    interval_ms = int(settings.heartbeat_interval * 1000)
    sock.setsockopt(zmq.LINGER, 100)
    sock.setsockopt(zmq.HEARTBEAT_IVL, interval_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, interval_ms * settings.heartbeat_liveness)
    sock.setsockopt(zmq.HEARTBEAT_TTL, interval_ms * settings.heartbeat_liveness)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_BODY_BYTES + 1024)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if sock.type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        if sock.type == zmq.ROUTER:
            sock.curve_server = True
        else:
            sock.curve_serverkey = keys.public
    return sock


def drain(sock: zmq.Socket) -> Iterator[list[bytes]]:
    """The frames of each message waiting on ``sock``, up to :data:`DRAIN`, without
    blocking: bounded, so a role's timers and other work still run under load."""
    for _ in range(DRAIN):
        if not waiting(sock):  # asking is cheaper than the exception of a read that fails
            return
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:  # not expected after POLLIN; a drain must never raise for it
            return


def receive(sock: zmq.Socket, allowed: Allowed, refused: Callable[[ProtocolError], None],
            envelope: int = 0) -> list[Message]:
    """The messages :func:`drain` finds on ``sock``, decoded against ``allowed`` after
    ``envelope`` routing frames; ``refused`` hears of each one that is not valid (it is
    dropped)."""
    out: list[Message] = []
    for frames in drain(sock):
        try:
            out.append(decode(frames[envelope:], allowed)[1])
        except ProtocolError as exc:
            refused(exc)
    return out


class _Members:
    """ZAP policy: a client is a member when it presents the mesh's public key. A process
    without the secret already fails the CURVE handshake; this also turns away one that
    learnt the public key but made up its own key pair."""

    def __init__(self, keys: MeshKeys) -> None:
        self.public = keys.public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public  # a refusal is counted and logged by the broker


def admit_members(ctx: zmq.Context, keys: MeshKeys) -> ThreadAuthenticator:
    """Start the ZAP handler of ``ctx`` (before its ROUTER binds); stop it on shutdown."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("auth.zap"))
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_Members(keys))
    return auth


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
KEY_HINT_EVERY_S = 30.0
KEY_HINT_AFTER = 3
"""Handshakes failed in a row before the hint: a broker killed in mid-handshake fails
one too (then refuses connections), a secret that differs fails every one."""
_last_key_hint = 0.0
_failed_in_a_row = 0
log = logging.getLogger("transport")


def watch_disconnects(sock: zmq.Socket, refusals: bool = False) -> zmq.Socket:
    """A PAIR socket that becomes readable when ``sock`` loses an established connection:
    its peer process died (the kernel closed the TCP connection) or ZMTP heartbeats timed
    out. A killed process is then known in milliseconds instead of after the heartbeat
    liveness; our own heartbeats remain the judge for peers that hang without dying.
    Failed CURVE handshakes are reported too, so that a wrong secret is explained (and
    successful ones, which reset that explanation's count). With ``refusals``, so is a
    connection refused (nobody listens there: the process is dead)."""
    events = zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED
    # A unique address: pyzmq's default derives it from the socket's file descriptor,
    # which the socket this one replaces may just have freed.
    return sock.get_monitor_socket(
        events | zmq.EVENT_CONNECT_RETRIED if refusals else events,
        f"inproc://monitor-{uuid.uuid4().hex}")


def disconnected(monitor: zmq.Socket) -> bool:
    """Drain a :func:`watch_disconnects` socket; whether a disconnection (or a refused
    connection, if watched) was reported. Callers look on every token or wake-up, and
    nearly always find nothing: asking first spares them a failed read's exception."""
    seen = False
    while waiting(monitor):
        try:
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:  # only if the event went between the asking and the reading
            return seen
        if event["event"] & HANDSHAKE_FAILED:
            _explain_refusal(event["endpoint"])
        elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            _handshake_succeeded()
        seen = seen or event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECT_RETRIED)
    return seen


def _handshake_succeeded() -> None:
    global _failed_in_a_row
    _failed_in_a_row = 0


def _explain_refusal(endpoint: bytes) -> None:
    """A broker turned us away at the handshake again and again: almost always a mesh
    secret that differs (or exists on one side only). Say so, at most every 30 s while it
    goes on."""
    global _last_key_hint, _failed_in_a_row
    _failed_in_a_row += 1
    now = time.monotonic()
    if _failed_in_a_row < KEY_HINT_AFTER or (
            now - _last_key_hint < KEY_HINT_EVERY_S and _last_key_hint):
        return
    _last_key_hint = now
    log_event(log, "handshake_refused", logging.WARNING, broker=endpoint.decode(errors="replace"),
              hint="this node's mesh secret differs from that broker's (or only one side has "
              "one): run `mlx-stack mesh enable --join TOKEN` with the token that "
              "`mlx-stack mesh token` prints on a member")


def watch_refusals(sock: zmq.Socket) -> zmq.Socket:
    """A PAIR socket that becomes readable when a listening ``sock`` turns a connection
    away at the handshake (CURVE/ZAP: no secret, a foreign one, not a member)."""
    return sock.get_monitor_socket(HANDSHAKE_FAILED, f"inproc://refusals-{uuid.uuid4().hex}")


def refused_peers(monitor: zmq.Socket) -> list[str]:
    """Drain a :func:`watch_refusals` socket: the address of each connection turned away."""
    peers = []
    while True:
        try:
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return peers
        peers.append(event["endpoint"].decode(errors="replace"))


def close_watched(sock: zmq.Socket, monitor: zmq.Socket, linger: int = 0) -> None:
    """Close a socket and its disconnect monitor."""
    sock.disable_monitor()
    monitor.close(linger=0)
    sock.close(linger=linger)


class BrokerChoice:
    """Which broker a worker or gateway talks to.

    It starts at this node's broker, follows REDIRECTs to the coordinator, and when the
    broker in use falls silent goes back to this node's broker (which knows whom to
    redirect to); when that one is the silent one, it tries the static peers in turn.
    """

    def __init__(self, candidates: list[str]) -> None:
        self.candidates = candidates
        self.current = candidates[0]
        self._turn = 0

    def redirect(self, endpoint: str) -> None:
        self.current = endpoint

    def advance(self) -> str:
        home, others = self.candidates[0], self.candidates[1:]
        if self.current != home or not others:
            self.current = home
        else:
            self.current = others[self._turn % len(others)]
            self._turn += 1
        return self.current
