"""The product installs under its own import name, ``mlx_stack.<role>`` (the folders stay at
the top of the repository, mapped by pyproject's package-dir): packages named ``common``,
``cli``, ``broker``, ``worker`` or ``gateway`` elsewhere in a user's environment shadow
nothing, and none of those names is installed by us."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

ROLES = ("common", "cli", "broker", "worker", "gateway")


def test_packages_named_like_the_roles_shadow_nothing(tmp_path: Path) -> None:
    for name in ROLES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} shadowed')\n")
    done = subprocess.run([sys.executable, "-m", "mlx_stack.cli", "--help"], cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin",
                               "COLUMNS": "120"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


def test_the_distribution_installs_only_the_mlx_stack_name() -> None:
    top = distribution("mlx-stack").read_text("top_level.txt")
    assert top is not None and set(top.split()) == {"mlx_stack"}, top
