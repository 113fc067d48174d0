"""``python -m cli``: the same as the ``mlx-stack`` console script (used by ``up``)."""

from cli.main import app

app(prog_name="mlx-stack")
