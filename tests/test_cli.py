"""The command line as a user runs it: `mlx-stack up` serves, heals and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import openai
import psutil
import pytest

from testkit.harness import Proc, free_port, run_cli, wait_for


def roles(pid: int) -> dict[int, str]:
    """The live role children of process ``pid``: {pid: "broker"|"worker"|"gateway"}."""
    found = {}
    for child in psutil.Process(pid).children():
        try:
            found[child.pid] = child.cmdline()[3]  # python -m mlx_stack.cli <role> ...
        except (psutil.ZombieProcess, psutil.NoSuchProcess, IndexError):
            continue
    return found


def test_help_explains_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("up", "broker", "worker", "gateway", "pull"):
        assert command in result.stdout
    up = run_cli("up", "--help").stdout
    assert "--port" in up and "--model" in up and "localhost:4000" in run_cli("--help").stdout
    assert "SPEC[=TIER" in up and "default=fast" in up and "[models] serve" in up


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("gateway", env={"MLX_STACK_HOME": str(tmp_path),
                                     "MLX_STACK_GATEWAY_PORT": "four"})
    assert result.returncode == 2
    assert "MLX_STACK_GATEWAY_PORT" in result.stderr


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("worker", "--model", "no-such-org/no-such-model",
                     env={"MLX_STACK_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert "downloads nothing from a model hub" in " ".join(result.stderr.split())


def start_up(tmp_path: Path, models_dir: Path, node_id: str, *args: str
             ) -> tuple[Proc, int, int]:
    """``mlx-stack up`` as a user runs it, on free ports: (process, gateway port, broker
    port)."""
    port, broker_port = free_port(), free_port()
    up = Proc("up", [sys.executable, "-m", "mlx_stack.cli", "up", "--port", str(port),
                     "--broker-port", str(broker_port), "--node-id", node_id, *args],
              {**os.environ, "MLX_STACK_HOME": str(tmp_path / "home"),
               "MLX_STACK_MODELS_DIR": str(models_dir), "PYTHONUNBUFFERED": "1",
               # How long a request waits for the loading worker: on a loaded CI machine
               # loading may take longer than the 10 s default.
               "MLX_STACK_GRACE": "60"},
              tmp_path / "up.log")
    return up, port, broker_port


@pytest.mark.model
def test_up_serves_restarts_a_dead_child_and_stops_everything(
        tmp_path: Path, models_dir: Path) -> None:
    up, port, broker_port = start_up(tmp_path, models_dir, "solo")
    try:
        client = openai.OpenAI(base_url=f"http://localhost:{port}/v1", api_key="x",
                               max_retries=0, timeout=60)

        def ask() -> str:
            return client.chat.completions.create(
                model="standard", temperature=0, messages=[
                    {"role": "user", "content": "What is the capital of France?"}],
            ).choices[0].message.content

        def answers() -> bool:
            if not up.alive():
                pytest.fail(up.output())
            try:
                return bool(client.models.list())
            except openai.APIConnectionError:
                return False

        # As a new user would: ask as soon as the endpoint answers, while the worker may
        # still be loading (the broker knows the model will come: no 404).
        wait_for("GET /v1/models to answer", answers, timeout=120)
        assert "Paris" in ask()
        wait_for("the banner", lambda: f"OPENAI_API_BASE=http://localhost:{port}/v1"
                 in up.output(), timeout=60)
        first = roles(up.pid)
        assert sorted(first.values()) == ["broker", "gateway", "worker"]
        worker = next(pid for pid, role in first.items() if role == "worker")
        os.kill(worker, signal.SIGKILL)
        wait_for("a new worker", lambda: any(
            role == "worker" and pid != worker for pid, role in roles(up.pid).items()),
            timeout=30)
        assert "Paris" in ask()  # waits within the grace period for the new worker
        assert "worker" in up.output() and "restarting" in up.output()
        children = [psutil.Process(pid) for pid in roles(up.pid)]
        env = {"MLX_STACK_HOME": str(tmp_path / "home"),
               "MLX_STACK_BROKER_PORT": str(broker_port)}
        status = json.loads(run_cli("status", "--json", env=env).stdout)
        assert status["foreground_up_pid"] == up.pid and status["mesh"]["role"] == "coordinator"
        assert run_cli("down", env=env).returncode == 0  # as a user stops it from elsewhere
        assert up.popen.wait(30) == 0
        for child in children:
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        up.stop()


@pytest.mark.model
def test_up_serves_a_users_model_as_a_tier_and_the_default_model_under_none(
        tmp_path: Path, models_dir: Path) -> None:
    own = tmp_path / "Smol-premium"  # the user's own model: the default's files, linked
    own.mkdir()
    for item in (models_dir / "SmolLM2-135M-Instruct").iterdir():
        (own / item.name).symlink_to(item)
    up, port, _ = start_up(tmp_path, models_dir, "tiers", "--model", f"{own}=premium",
                           "--model", "default")
    try:
        client = openai.OpenAI(base_url=f"http://localhost:{port}/v1", api_key="x",
                               max_retries=0, timeout=60)

        def both_up() -> dict[str, openai.types.Model] | None:
            if not up.alive():
                pytest.fail(up.output())
            try:
                cards = {m.id: m for m in client.models.list()}
            except openai.APIConnectionError:
                return None
            return cards if {"Smol-premium", "SmolLM2-135M-Instruct"} <= cards.keys() else None

        cards = wait_for("both workers in /v1/models", both_up, timeout=180)
        assert sorted(cards) == ["Smol-premium", "SmolLM2-135M-Instruct", "premium"]
        premium = cards["premium"].model_dump()
        assert premium["root"] == "Smol-premium" and premium["context_length"] > 1000
        assert premium["max_model_len"] == premium["context_length"]
        answer = client.chat.completions.create(
            model="premium", max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": "hi"}])
        assert answer.model == "Smol-premium"
        with pytest.raises(openai.NotFoundError):  # the default model is not standard now
            client.chat.completions.create(model="standard", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
        assert "Smol-premium (tiers: premium)" in up.output()
    finally:
        up.stop()
