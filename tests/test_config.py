"""Settings: layered sources, and values refused before they can break the mesh."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_stack.common.config import Settings, update_config_file
from mlx_stack.common.names import ModelSpec


def test_layers_config_file_then_environment_then_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    update_config_file(tmp_path, gateway_port=4001, queue_size=7, priority=2)
    monkeypatch.setenv("MLX_STACK_QUEUE_SIZE", "8")
    cfg = Settings.load(home=tmp_path, priority=3)
    assert (cfg.gateway_port, cfg.queue_size, cfg.priority) == (4001, 8, 3)
    update_config_file(tmp_path, gateway_port=None)  # None removes the key
    assert Settings.load(home=tmp_path).gateway_port == 4000


@pytest.mark.parametrize("bad", [{"max_body_bytes": 10**9}, {"request_timeout": float("inf")},
                                 {"heartbeat_interval": 0.0}, {"gateway_port": 70000}])
def test_values_the_mesh_cannot_work_with_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=r"config\.toml"):
        Settings(**bad)


def test_unknown_settings_are_named(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("gatway_port = 1\n")
    with pytest.raises(ValueError, match="gatway_port"):
        Settings.load(home=tmp_path)


def test_the_models_section_says_what_to_serve_and_what_each_name_means(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.load(home=tmp_path).model_specs == []  # nothing said: the default model
    (tmp_path / "config.toml").write_text(
        'gateway_port = 4001\n[models]\n'
        'serve = ["~/models/Qwen2.5-32B-Instruct-4bit=standard,premium", "default=fast",'
        ' "mlx-community/Llama-3.1-8B"]\n'
        'names = { "claude-*haiku*" = "fast", "gpt-*" = "premium" }\n')
    cfg = Settings.load(home=tmp_path)
    assert cfg.gateway_port == 4001
    assert cfg.model_specs == [
        ModelSpec("~/models/Qwen2.5-32B-Instruct-4bit", ("standard", "premium"), True),
        ModelSpec("default", ("fast",), True), ModelSpec("mlx-community/Llama-3.1-8B")]
    assert cfg.name_map == {"claude-*haiku*": "fast", "gpt-*": "premium"}
    monkeypatch.setenv("MLX_STACK_SERVE", "default=;/m/x=premium")  # the environment's form
    assert [str(s) for s in Settings.load(home=tmp_path).model_specs] == ["default=",
                                                                         "/m/x=premium"]


@pytest.mark.parametrize("section, says", [
    ('serve = ["default=fast,not a tier"]', "SPEC=TIER"),
    ('serve = "default"', "list of strings"),
    ('tiers = ["fast"]', "takes serve"),
    ('names = { "claude-*" = 3 }', "PATTERN"),
])
def test_a_bad_models_section_names_the_fix(tmp_path: Path, section: str, says: str) -> None:
    (tmp_path / "config.toml").write_text(f"[models]\n{section}\n")
    with pytest.raises(ValueError, match=says):
        Settings.load(home=tmp_path)


def test_a_boolean_setting_takes_words_from_the_environment_and_refuses_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cache_routing``: TOML's false, the environment's "off"/"0"/"false"; "flase" is
    refused (``bool("false")`` would be true: the switch silently left on)."""
    assert Settings.load(home=tmp_path).cache_routing is True
    update_config_file(tmp_path, cache_routing=False)
    assert Settings.load(home=tmp_path).cache_routing is False
    for word, value in (("on", True), ("0", False), ("False", False), ("yes", True)):
        monkeypatch.setenv("MLX_STACK_CACHE_ROUTING", word)
        assert Settings.load(home=tmp_path).cache_routing is value, word
    monkeypatch.setenv("MLX_STACK_CACHE_ROUTING", "flase")
    with pytest.raises(ValueError, match="MLX_STACK_CACHE_ROUTING"):
        Settings.load(home=tmp_path)
