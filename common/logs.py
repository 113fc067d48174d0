"""Structured, quiet-by-default logging: one line per event, ``key=value`` fields.

Roles log events, not prose: ``log_event(log, "worker_purged", worker=w, after_s=1.5)``
prints ``... broker worker_purged worker=ab12 after_s=1.5``, which grep and log
shippers read alike.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


def setup(role: str, level: str = "warning") -> logging.Logger:
    """Configure the root logger for a role's process and return the role's logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s.%(msecs)03d %(levelname)s {role} %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger(role)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with ``fields`` rendered as ``key=value`` (values quoted if spaced)."""
    if not logger.isEnabledFor(level):
        return
    parts = [event]
    for key, value in fields.items():
        text = str(value)
        parts.append(f"{key}={text!r}" if " " in text or not text else f"{key}={text}")
    logger.log(level, " ".join(parts))
