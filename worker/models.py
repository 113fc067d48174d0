"""Which model directory a worker serves, from what the user typed after ``--model``."""

from __future__ import annotations

from pathlib import Path

from worker.default_model import DEFAULT_ALIASES, DEFAULT_MODEL_ID, ensure_default_model


def resolve_model(spec: str | None, models_dir: Path) -> tuple[Path, str, list[str]]:
    """Return (directory, model id, default aliases) for ``spec``.

    ``spec`` is empty (the default model, pulled and converted on first use), a local
    mlx-lm model directory, or a Hugging Face id already in the local cache. Nothing is
    downloaded from a model hub.
    """
    if not spec or spec in ("default", DEFAULT_MODEL_ID):
        return ensure_default_model(models_dir), DEFAULT_MODEL_ID, list(DEFAULT_ALIASES)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; pass an mlx-lm model directory "
                             "(Hugging Face layout: config.json, *.safetensors, tokenizer)")
        return path.resolve(), path.name, []
    if (models_dir / spec / "config.json").is_file():
        return models_dir / spec, spec, []
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True)), spec, []
    except (LocalEntryNotFoundError, ValueError):
        raise ValueError(
            f"model '{spec}' is not a local directory, not in {models_dir}, and not in the "
            "local Hugging Face cache. mlx-stack downloads nothing from a model hub: copy "
            "the model directory here and pass its path."
        ) from None
