"""Entry point of the worker role (``mlx-stack worker``)."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

from mlx_stack.common import heap, logs
from mlx_stack.common.config import Settings
from mlx_stack.common.names import ModelSpec
from mlx_stack.worker.engine import Engine
from mlx_stack.worker.server import Worker, system_memory
from mlx_stack.worker.synthetic import CACHE_ENTRIES, SyntheticEngine
from mlx_stack.worker.tools import family


@dataclass(frozen=True)
class SyntheticOptions:
    """How a synthetic worker behaves (``mlx-stack worker --engine synthetic``)."""

    slots: int = 4
    rate: float = 200.0
    ttft: float = 0.0
    mem_total: int = 0
    """Memory to report instead of the machine's (bytes; 0 = the real figures), so that
    routing by memory headroom can be tested on one machine."""
    mem_free: int = 0
    tool_parser: str = ""
    """mlx-lm tool parser whose calls a script may write (``--tool-parser``)."""
    context_length: int = 262_144
    """Prompt bytes and answer tokens a job may hold (``--context-length``): an agent's
    prompt (Claude Code's is tens of kilobytes) needs more than the default."""
    prefill_rate: float = 0.0
    """Prompt bytes per second computed when not in its prompt cache (``--prefill-rate``);
    0 = at once."""
    prompt_cache: int = CACHE_ENTRIES
    """Ended sequences its prompt cache keeps (``--prompt-cache``); 0 = none."""


def main(settings: Settings, model: ModelSpec,
         synthetic: SyntheticOptions | None = None) -> None:
    """Load ``model`` (or start a synthetic engine under its name) and serve it to the
    broker under its tiers until SIGINT/SIGTERM. A worker alone knows no other model of
    its node: the default model takes its tiers unless ``model`` names them (``mlx-stack
    up`` and ``install`` always do)."""
    logs.setup("worker", settings.log_level, settings.log_file)
    engine: Engine
    memory = None
    if synthetic is not None:
        name = "synthetic" if model.spec == "default" else model.spec
        engine = SyntheticEngine(name, synthetic.slots, synthetic.rate, synthetic.ttft,
                                 family(synthetic.tool_parser)
                                 if synthetic.tool_parser else None, synthetic.context_length,
                                 synthetic.prefill_rate, synthetic.prompt_cache)
        tiers = list(model.tiers)
        if synthetic.mem_total:
            fixed = (synthetic.mem_total, synthetic.mem_free)
            memory = lambda: fixed  # noqa: E731
    else:
        from mlx_stack.worker.mlx_engine import MlxEngine
        from mlx_stack.worker.models import resolve_model, tiers_of

        path, model_id = resolve_model(model.spec, settings.models_path)
        tiers = tiers_of(model, alone=True)
        engine = MlxEngine(path, model_id, max_slots=settings.max_slots,
                           prompt_cache_bytes=settings.prompt_cache_bytes,
                           free_memory=system_memory()[1])
    worker = Worker(engine, settings, tiers, memory)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    heap.settle()
    status = worker.run()
    # Exit without interpreter finalization: a thread that ran MLX inference runs MLX's
    # thread-local destructors at its exit, and they take the GIL; if that races with
    # finalization, libstdc++ aborts the process (SIGABRT). Everything is closed by now.
    logging.shutdown()
    os._exit(status)
