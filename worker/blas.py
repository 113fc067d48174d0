"""Make MLX's Linux CPU backend use a real OpenBLAS.

Why: the mlx-cpu wheel links a bundled reference BLAS (~5 GFLOP/s here). Loading an
optimised OpenBLAS (Debian's ``libopenblas0-pthread``, ~180 GFLOP/s) with RTLD_GLOBAL
*before the first ``import mlx.core``* makes the dynamic linker resolve MLX's
``cblas_sgemm`` & co. to it: prompt processing of a float32 model gets ~13x faster and
generation ~2x. After mlx.core is imported it is too late, hence ``worker/__init__.py``.

On macOS MLX uses Metal/Accelerate and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from pathlib import Path

_SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


@functools.cache
def preload_openblas() -> str | None:
    """Load an OpenBLAS globally so MLX's CPU backend uses it; return its path or None.

    Never raises: without it MLX still works, only slower. Returns None on non-Linux
    platforms, when no OpenBLAS is installed, or when ``mlx.core`` is already imported.
    """
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return None
    found = [ctypes.util.find_library("openblas"), *_SYSTEM_CANDIDATES]
    for path in filter(None, found):
        if path.startswith("/") and not Path(path).exists():
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return path
    return None
