"""Which model directory a worker serves, and under which tiers, from what the user typed
after ``--model`` (``SPEC[=TIER[,TIER...]]``, common/names.py)."""

from __future__ import annotations

from pathlib import Path

from mlx_stack.common.names import ModelSpec
from mlx_stack.worker.default_model import DEFAULT_MODEL_ID, DEFAULT_TIERS, ensure_default_model


def is_default(spec: str) -> bool:
    """Whether ``spec`` names the default model (one way to say it, three spellings)."""
    return spec in ("", "default", DEFAULT_MODEL_ID)


def tiers_of(model: ModelSpec, alone: bool) -> list[str]:
    """The tiers ``model`` answers to: those given (``SPEC=TIER,...``; ``SPEC=`` gives
    none); else, for the default model alone on its node, ``fast`` and ``standard``, so
    that a first ``mlx-stack up`` answers to them; else none. Beside other models the
    default takes no tier unasked: a 135M model must not answer ``standard`` for a mesh
    whose ``standard`` is a 32B model."""
    if model.explicit:
        return list(model.tiers)
    return list(DEFAULT_TIERS) if alone and is_default(model.spec) else []


def resolve_model(spec: str, models_dir: Path) -> tuple[Path, str]:
    """Return (directory, model id) for ``spec``.

    ``spec`` is the default model (pulled and converted on first use), a local mlx-lm
    model directory, a name under ``models_dir``, or a Hugging Face id already in the
    local cache. Nothing is downloaded from a model hub.
    """
    if is_default(spec):
        return ensure_default_model(models_dir), DEFAULT_MODEL_ID
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; pass an mlx-lm model directory "
                             "(Hugging Face layout: config.json, *.safetensors, tokenizer)")
        return path.resolve(), path.name
    if (models_dir / spec / "config.json").is_file():
        return models_dir / spec, spec
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True)), spec
    except (LocalEntryNotFoundError, ValueError):
        raise ValueError(
            f"model '{spec}' is not a local directory, not in {models_dir}, and not in the "
            "local Hugging Face cache. mlx-stack downloads nothing from a model hub: copy "
            "the model directory here and pass its path."
        ) from None
