"""What any two releases of the mesh read of each other, whatever their protocols.

People upgrade one Mac at a time: a broker hears ANNOUNCEs of other protocol versions
(their tags differ, :mod:`common.wire`, so they never decode). Two things are frozen
across every release so that each can still tell the other apart: the shape of a tag
(:data:`TAG`) and the :class:`Hello` in an ANNOUNCE. This release's numbers are
:data:`common.wire.PROTOCOL` and :data:`common.messages.VERSION`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlx_stack.common.messages import Command
from mlx_stack.common.plain import ProtocolError
from mlx_stack.common.wire import PROTOCOL, read_map

_ANNOUNCE = bytes((Command.ANNOUNCE,))

TAG = re.compile(rb"MLXS-([GWB])([0-9]{1,6})")
"""Every version's tags: ``MLXS-`` + G (gateway), W (worker) or B (broker) + the protocol
number. Frozen, like :func:`hello`'s fields: the one part of the protocol no release may
change, so that any two releases can tell each other apart."""


def tag_version(tag: bytes) -> int | None:
    """The protocol number in a tag of any version (None for anything else)."""
    match = TAG.fullmatch(tag)
    return int(match.group(2)) if match else None


def tag_role(tag: bytes) -> tuple[str, int] | None:
    """The role (``G``, ``W`` or ``B``) and protocol number of a tag of any version (None
    for anything else)."""
    match = TAG.fullmatch(tag)
    return (match.group(1).decode(), int(match.group(2))) if match else None


@dataclass(frozen=True, slots=True)
class Hello:
    """What a broker of another protocol version says of itself in its ANNOUNCE, read
    the way every version can: its tag's number, and four fields of the body's msgpack
    map that every release's ANNOUNCE keeps (``version`` since protocol 4)."""

    protocol: int
    node_id: str
    endpoint: str
    coordinator: bool = False
    version: str = ""


def hello(frames: list[bytes]) -> Hello | None:
    """The :class:`Hello` in an ANNOUNCE of another protocol version (three frames, a
    broker tag of a number not :data:`PROTOCOL`); None for anything else. Nothing else of
    the message is read: its schema is that version's business."""
    if len(frames) != 3 or frames[1] != _ANNOUNCE:
        return None
    match = TAG.fullmatch(frames[0])
    if match is None or match.group(1) != b"B" or int(match.group(2)) == PROTOCOL:
        return None
    try:
        body = read_map(frames[2])
    except ProtocolError:
        return None
    node_id, endpoint = body.get("node_id"), body.get("endpoint")
    coordinator, version = body.get("coordinator", False), body.get("version", "")
    if not (type(node_id) is str and type(endpoint) is str and 0 < len(node_id) <= 200
            and 0 < len(endpoint) <= 200 and type(coordinator) is bool
            and type(version) is str and len(version) <= 40):
        return None
    return Hello(int(match.group(2)), node_id, endpoint, coordinator, version)
