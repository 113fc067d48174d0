"""What the prompt cache served, end to end (real processes, a synthetic worker with its
prompt cache): the worker's RELEASE tells the broker, which records it in the route log
(``mesh routes``); the client reads it in OpenAI's usage; ``/metrics`` has the share reused."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from testkit.harness import Cluster, close_and_report, run_cli, wait_for

SYSTEM = "You are a patient agent. " * 100
"""2,500 bytes: prompt tokens of the synthetic engine, above the match routing weighs."""


def test_a_second_turn_reports_the_tokens_its_cache_served(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """An agent's first turn finds nothing in the cache: 0 cached tokens in its usage and
    in its route. Its second turn, routed for the history the worker holds, reuses it:
    the usage of the chat completion, the Responses API, the streamed usage chunk and
    Anthropic's Messages API say how many tokens, the route log (filled only by the
    worker's RELEASE) says the same beside the match the broker predicted, and /metrics
    has a share of reused prompt tokens above 0."""
    cluster = Cluster(tmp_path)
    try:
        cluster.broker()
        cluster.worker("--engine", "synthetic", "--model", "syn", "--rate", "400",
                       "--slots", "4")
        url = cluster.gateway()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        history: list[Any] = [{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": "Step 1 of the task."}]
        first = client.chat.completions.create(model="syn", messages=history, max_tokens=4)
        assert first.usage and first.usage.prompt_tokens_details
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        history += [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Step 2 of the task."}]
        second = client.chat.completions.create(model="syn", messages=history, max_tokens=4)
        assert second.usage and second.usage.prompt_tokens_details
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert len(SYSTEM) < cached < second.usage.prompt_tokens, second.usage

        def routes() -> dict[str, dict[str, Any]] | None:
            result = run_cli("mesh", "routes", "--json", "--broker", cluster.endpoint,
                             env=cluster.env)
            assert result.returncode == 0, result.stderr
            done = {r["request_id"]: r for r in json.loads(result.stdout)
                    if r["outcome"] == "ok"}
            return done if len(done) == 2 else None

        by_request = wait_for("both turns released", routes)
        turn1 = by_request[first.id.removeprefix("chatcmpl-")]
        turn2 = by_request[second.id.removeprefix("chatcmpl-")]
        assert (turn1["reused"], turn1["computed"]) == (0, first.usage.prompt_tokens)
        assert turn2["reused"] == cached
        assert turn2["computed"] == second.usage.prompt_tokens - cached
        assert turn2["candidates"][0]["cached"] > len(SYSTEM)  # the match predicted

        history += [{"role": "assistant", "content": second.choices[0].message.content},
                    {"role": "user", "content": "Step 3 of the task."}]
        chunks = list(client.chat.completions.create(
            model="syn", messages=history, max_tokens=4, stream=True,
            stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        assert usage and usage.prompt_tokens_details
        assert usage.prompt_tokens_details.cached_tokens > cached
        answer = client.responses.create(model="syn", input=history, max_output_tokens=4)
        assert answer.usage and answer.usage.input_tokens_details.cached_tokens > cached
        message = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0).messages.create(
            model="syn", system=SYSTEM, messages=history[1:], max_tokens=4)
        # Anthropic's accounting: input_tokens are those not read from the cache.
        assert message.usage.cache_read_input_tokens > cached
        assert 0 < message.usage.input_tokens < message.usage.cache_read_input_tokens

        def reused_ratio() -> float | None:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            found = re.search(r'^mlx_stack_prompt_tokens_reused_ratio\{model="syn"\} (\S+)$',
                              text, re.M)
            return float(found[1]) if found and float(found[1]) > 0 else None

        assert 0 < wait_for("a reused ratio in /metrics", reused_ratio) < 1
    finally:
        close_and_report(cluster, request.node)
