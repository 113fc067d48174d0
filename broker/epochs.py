"""The highest epoch this node's broker has seen, kept in its home across restarts.

Fencing compares epochs: a message from a broker with a lower epoch than one already seen
is ignored. A lone broker that restarted and counted from 1 again would be such a broker
to anyone who saw its earlier epochs; read back here, its next term is higher instead.

One file per broker port: brokers sharing a home (several on one machine) keep their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from mlx_stack.common.logs import log_event

log = logging.getLogger("broker")



def path(home: Path, port: int) -> Path:
    return home / f"epoch-{port}"


def load(home: Path, port: int) -> int:
    """The epoch saved for the broker on ``port`` (0 when none or unreadable: a fresh
    start)."""
    with contextlib.suppress(OSError, ValueError):
        return max(0, int(path(home, port).read_text(encoding="ascii").strip()))
    return 0


def save(home: Path, port: int, epoch: int) -> None:
    """Keep ``epoch`` for the broker on ``port``, atomically (a crash leaves the old value
    or the new). A home that cannot be written is logged, not raised: the broker keeps
    serving, and only fencing after a restart is lost."""
    partial = home / f"epoch-{port}.{os.getpid()}.tmp"
    try:
        home.mkdir(parents=True, exist_ok=True)
        partial.write_text(str(epoch), encoding="ascii")
        os.replace(partial, path(home, port))
    except OSError as exc:
        log_event(log, "epoch_not_saved", logging.ERROR, error=exc.strerror,
                  hint=f"make {home} writable")
