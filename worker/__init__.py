"""The worker role: one process per served model, an mlx-lm engine behind a DEALER.

Importing this package prepares the process for mlx-lm before anything imports it:
- on Linux it loads a real OpenBLAS (see :mod:`worker.blas`): MLX binds its BLAS when
  ``mlx.core`` is first imported, and the bundled reference BLAS is ~25x slower on CPU;
- it silences transformers' "PyTorch was not found" advice: mlx-lm needs no PyTorch.
"""

import os

from mlx_stack.worker.blas import preload_openblas

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
preload_openblas()
