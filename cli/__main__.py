"""``python -m mlx_stack.cli``: the same as the ``mlx-stack`` console script (used by ``up``)."""

from mlx_stack.cli.main import app

app(prog_name="mlx-stack")
