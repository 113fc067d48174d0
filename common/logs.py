"""Structured, quiet-by-default logging: one line per event, ``key=value`` fields.

Roles log events, not prose: ``log_event(log, "worker_purged", worker=w, after_s=1.5)``
prints ``... broker worker_purged worker=ab12 after_s=1.5``, which grep and log
shippers read alike.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

LOG_FILE_BYTES = 10 * 1024 * 1024
LOG_FILES_KEPT = 3


def setup(role: str, level: str = "warning", file: str = "") -> logging.Logger:
    """Configure the root logger for a role's process and return the role's logger.

    To stderr; or with ``file`` (a role run as a service), to that file, capped at
    :data:`LOG_FILE_BYTES` and rotated (``.1`` .. ``.3`` kept), with the date in each line."""
    if file:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILES_KEPT, encoding="utf-8")
        stamp = "%Y-%m-%d %H:%M:%S"
    else:
        handler = logging.StreamHandler(sys.stderr)
        stamp = "%H:%M:%S"
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s.%(msecs)03d %(levelname)s {role} %(message)s", stamp))
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
