"""Entry point of the broker role (``mlx-stack broker``)."""

from __future__ import annotations

import signal

from mlx_stack.broker.server import Broker
from mlx_stack.common import heap, logs
from mlx_stack.common.config import Settings


def main(settings: Settings) -> None:
    """Run a broker in the foreground until SIGINT/SIGTERM."""
    logs.setup("broker", settings.log_level, settings.log_file)
    broker = Broker(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker.stop())
    heap.settle()
    broker.run()
