"""The highest epoch this node's broker has seen, kept in its home across restarts.

Fencing compares epochs: a message from a broker with a lower epoch than one already seen
is ignored. A lone broker that restarted and counted from 1 again would be such a broker
to anyone who saw its earlier epochs; read back here, its next term is higher instead.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FILE = "epoch"


def load(home: Path) -> int:
    """The epoch saved in ``home`` (0 when none, or unreadable: a fresh start)."""
    with contextlib.suppress(OSError, ValueError):
        return max(0, int((home / FILE).read_text(encoding="ascii").strip()))
    return 0


def save(home: Path, epoch: int) -> None:
    """Keep ``epoch`` in ``home``, atomically (a crash leaves the old value or the new)."""
    home.mkdir(parents=True, exist_ok=True)
    partial = home / f"{FILE}.tmp"
    partial.write_text(str(epoch), encoding="ascii")
    os.replace(partial, home / FILE)
