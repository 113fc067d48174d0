"""Agent frameworks people run, unchanged, against a test mesh: the OpenAI Agents SDK (its
Responses and Chat Completions model classes, ``Runner.run`` and ``Runner.run_streamed``)
and aider (its own program, from the virtual environment ``make test`` gives it).

The model is a synthetic worker that writes scripted output (``[[say]]``: it says what
follows the last marker in its prompt) in the Qwen/Hermes tool-call format, so each
client's whole loop runs: the model calls a tool, the client runs it and sends the
result, and the result (itself a script) is the model's final answer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import openai
import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from testkit.harness import Cluster

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
AIDER = Path(__file__).resolve().parent.parent / ".venv-aider" / "bin" / "aider"
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
"""A client that reaches for the internet meets a closed loopback port, at once."""


@pytest.fixture(scope="module")
def url(module_cluster: Cluster) -> str:
    """One tooly node for the module's agents: no test here kills or stops a worker."""
    cluster = module_cluster
    cluster.worker("--engine", "synthetic", "--model", "tooly", "--rate", "400",
                   "--tool-parser", "json_tools")
    return cluster.gateway("--log-level", "info")


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("api", ["responses", "chat"])
def test_an_agent_calls_its_tool_and_answers(url: str, api: str, streamed: bool) -> None:
    """Definition -> tool call -> tool result -> final answer, as the SDK ships."""
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        calls.append(city)
        return f"[[say]]It is sunny in {city}."

    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    model = (OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel)(
        "tooly", client)
    agent = Agent(name="forecaster", instructions="Answer with the weather.",
                  tools=[get_weather], model=model)

    async def run() -> str:
        if not streamed:
            return (await Runner.run(agent, "[[say]]" + CALL, max_turns=3)).final_output
        result = Runner.run_streamed(agent, "[[say]]" + CALL, max_turns=3)
        kinds = [event.type async for event in result.stream_events()]
        assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
        return result.final_output

    assert asyncio.run(asyncio.wait_for(run(), 120)) == "It is sunny in Paris."
    assert calls == ["Paris"]


@pytest.mark.skipif(not AIDER.exists(), reason=f"aider is not installed at {AIDER} "
                    "(make test installs it)")
def test_aider_applies_an_edit_to_a_git_repository(url: str, tmp_path: Path) -> None:
    """aider (through litellm, its ``openai/`` prefix) asks for an edit in its whole-file
    format; the scripted model answers with the new file, and aider writes and commits it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "main.py").write_text("print(1)\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "main.py"], ["commit", "-qm", "start"]):
        subprocess.run([*git, *args], cwd=repo, check=True, timeout=30)
    edit = "[[say]]main.py\n```\nprint(2)\n```\n"
    done = subprocess.run(
        [str(AIDER), "--model", "openai/tooly", "--openai-api-base", f"{url}/v1",
         "--openai-api-key", "unused", "--edit-format", "whole", "--yes-always",
         "--no-stream", "--no-check-update", "--no-analytics", "--no-show-model-warnings",
         "--no-pretty", "--no-fancy-input", "--message", edit, "main.py"],
        cwd=repo, capture_output=True, text=True, timeout=180,
        env={**os.environ, **OFFLINE, "HOME": str(tmp_path), "AIDER_CHECK_UPDATE": "false",
             "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (repo / "main.py").read_text() == "print(2)\n", done.stdout[-3000:]
    log = subprocess.run([*git, "log", "--format=%s"], cwd=repo, capture_output=True,
                         text=True, check=True, timeout=30).stdout
    assert len(log.splitlines()) == 2, log  # aider committed its edit
