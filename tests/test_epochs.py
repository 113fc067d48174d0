"""The epoch a broker keeps in its home (broker/epochs.py), without processes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mlx_stack.broker import epochs


def test_brokers_sharing_a_home_keep_their_own_epochs(tmp_path: Path) -> None:
    epochs.save(tmp_path, 4100, 7)
    epochs.save(tmp_path, 4101, 3)
    assert (epochs.load(tmp_path, 4100), epochs.load(tmp_path, 4101)) == (7, 3)
    assert epochs.load(tmp_path, 4102) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-4100", "epoch-4101"]


def test_a_home_that_cannot_be_written_is_logged_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "file"
    home.write_text("not a directory")
    with caplog.at_level(logging.ERROR):
        epochs.save(home, 4100, 5)
    assert "epoch_not_saved" in caplog.text and epochs.load(home, 4100) == 0
