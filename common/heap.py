"""Garbage collection in a serving process: what start-up built stays out of the way.

A full (generation 2) collection walks every object the process holds. In the gateway,
with FastAPI, pydantic and the OpenAI shapes loaded, one took 45-60 ms on the 2-vCPU VM,
a few times a minute under load, and every stream of the gateway waited for it: those
were the slowest first tokens at concurrency 32 (bench/vs_litellm.py). What start-up
builds (modules, classes, the app, a model's tokenizer) lives as long as the process, so
:func:`settle` moves it to the permanent generation, and later collections walk only
what serving made. (Raising the collector's thresholds was tried too: fewer pauses, but
longer ones.)
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Call once, when start-up is done and serving begins."""
    gc.collect()
    gc.freeze()
