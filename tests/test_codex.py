"""Codex CLI, unchanged, against the mesh: ``codex exec`` with a custom provider
(``wire_api = "responses"``) and Codex's default tool set (``multi_agent_v1`` namespace,
``web_search`` and the function tools).

The model is a scripted synthetic worker: the task's ``[[say]]`` makes it call Codex's
shell tool (``exec_command``), whose command prints the next script, so the turn after
the tool's output says it. Nothing leaves loopback: the proxies point at a dead port."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.harness import ROOT, Cluster, free_port

CODEX = ROOT / "tests" / "clients" / "node_modules" / ".bin" / "codex"
pytestmark = pytest.mark.skipif(not CODEX.exists(), reason="Codex CLI is not installed: run "
                                "`make test` (npm ci in tests/clients) to install it")


def scripted_worker(cluster: Cluster) -> None:
    """A ``tooly`` synthetic worker writing json_tools calls (its context holds Codex's
    prompt: some 40 kB of instructions)."""
    cluster.worker("--engine", "synthetic", "--model", "tooly", "--tool-parser", "json_tools")


def codex_home(tmp: Path, url: str) -> Path:
    """A ``CODEX_HOME`` whose config.toml points Codex at the mesh (the README's)."""
    home = tmp / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(f'''model = "tooly"
model_provider = "mlx"

[model_providers.mlx]
name = "mlx-stack mesh"
base_url = "{url}/v1"
wire_api = "responses"
''')
    return home


def run_codex(cluster: Cluster, tmp: Path, call: str) -> list[dict[str, Any]]:
    """``codex exec`` on a task that makes the scripted model write ``call`` (a JSON
    object, as text); the completed items it reports, once it exited 0 with no request
    of its refused (the gateway counted only 200s, and logged no refusal)."""
    scripted_worker(cluster)
    url = cluster.gateway()
    work = tmp / "work"
    work.mkdir()
    (work / "notes.txt").write_text("hello\n")
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "CODEX_HOME": str(codex_home(tmp, url)),
           "HTTPS_PROXY": dead, "HTTP_PROXY": dead, "ALL_PROXY": dead,
           "NO_PROXY": "127.0.0.1,localhost", "RUST_LOG": "error"}
    done = subprocess.run([str(CODEX), "exec", "--skip-git-repo-check", "-s", "read-only",
                           "--json", f"[[say]]<tool_call>\n{call}\n</tool_call>"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    statuses = re.findall(r'mlx_stack_requests_total\{model="[^"]*",status="(\d+)"\}',
                          metrics)
    assert statuses and set(statuses) == {"200"}, statuses
    log = next(p for p in cluster.procs if p.name.startswith("gateway")).output()
    assert "tools_ignored" in log and "tools=web_search" in log
    assert not re.search(r"status=4\d\d| (WARNING|ERROR) ", log), log[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [e["item"] for e in events if e.get("type") == "item.completed"]


def test_codex_exec_runs_a_shell_tool_round_trip(cluster: Cluster, tmp_path: Path) -> None:
    # The command prints "[[say]]Listed." without holding "[[say]]" itself (the synthetic
    # engine says what follows the last "[[say]]" of the whole conversation).
    call = {"name": "exec_command", "arguments": {"cmd": "ls; echo '[[sa''y]]Listed.'"}}
    items = run_codex(cluster, tmp_path, json.dumps(call))
    (ran,) = [i for i in items if i.get("type") == "command_execution"]
    assert "notes.txt" in ran["aggregated_output"] and ran["exit_code"] == 0
    assert items[-1]["type"] == "agent_message" and items[-1]["text"].strip() == "Listed."


def test_codex_dispatches_a_call_of_a_namespace_tool(cluster: Cluster, tmp_path: Path) -> None:
    """``wait_agent`` of Codex's ``multi_agent_v1`` namespace: Codex runs it (a call without
    its namespace would get "unsupported call"), and its error names the agent id asked
    for, which holds the next script ("\\u0079" is "y": the task itself holds no second
    "[[say]]")."""
    call = '{"name": "wait_agent", "arguments": {"targets": ["[[sa\\u0079]]Waited."]}}'
    items = run_codex(cluster, tmp_path, call)
    assert items[-1]["type"] == "agent_message"
    assert items[-1]["text"].startswith("Waited.")
