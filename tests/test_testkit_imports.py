"""A benchmark needs neither the test modules nor pytest: bench/ and testkit/ import
neither ``tests`` nor ``pytest``, read from their source and checked by importing every
module with both made unimportable."""

from __future__ import annotations

import ast
import subprocess
import sys

from testkit.harness import ROOT

FORBIDDEN = ("tests", "pytest")
PACKAGES = ("bench", "testkit")


def imported(path: str) -> set[str]:
    """The top-level names of every module ``path`` imports, wherever the import is."""
    tree = ast.parse((ROOT / path).read_text(), path)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for package in PACKAGES
                  for p in (ROOT / package).glob("*.py"))


def test_no_module_of_bench_or_testkit_imports_tests_or_pytest() -> None:
    found = {path: sorted(imported(path) & set(FORBIDDEN)) for path in modules()}
    assert len(found) >= 10, found  # the globs found the packages
    assert {path: names for path, names in found.items() if names} == {}


def test_every_benchmark_imports_with_tests_and_pytest_unimportable() -> None:
    names = [path.removesuffix(".py").replace("/", ".") for path in modules()]
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in FORBIDDEN)
    code = f"import importlib, sys; {block}\nfor name in {names!r}: importlib.import_module(name)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
