"""Shared fixtures: a fresh broker per test or per module, and one real-model node per
module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_stack.common.config import Settings
from testkit.harness import Cluster, close_and_report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Keep each phase's report on the item, so fixtures can print logs on failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The model cache the tests share (pulled once, like a user's first `up`)."""
    from mlx_stack.worker.default_model import ensure_default_model

    path = Settings.load().models_path
    ensure_default_model(path)
    return path


def running_broker(path: Path, node: pytest.Item | pytest.Module) -> Iterator[Cluster]:
    c = Cluster(path)
    try:
        c.broker()
        yield c
    finally:
        close_and_report(c, node)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A running broker (fast heartbeats: 200 ms x 3) and nothing else yet."""
    yield from running_broker(tmp_path, request.node)


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory,
                   request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A running broker that a module's tests share: for tests that leave what they
    share as they found it (no worker killed or stopped). Starting the nodes once per
    module, not per test, takes minutes off the suite."""
    yield from running_broker(tmp_path_factory.mktemp(request.module.__name__),
                              request.node)


@pytest.fixture(scope="module")
def model_node(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
               request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, str]]:
    """Broker + one real SmolLM2 worker + gateway; yields (cluster, gateway URL)."""
    c = Cluster(tmp_path_factory.mktemp("model-node"),
                env={"MLX_STACK_MODELS_DIR": str(models_dir)})
    try:
        c.broker()
        c.worker()
        yield c, c.gateway()
    finally:
        close_and_report(c, request.node)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
