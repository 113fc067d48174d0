"""Cache-aware routing with the real model (issue 27): two workers serve one model; each
agent's second turn goes back to the worker that served its first, while the other one
is idle, and that worker prefills only the new tokens, as mlx-lm itself counts them
(not the worker's own bookkeeping). That an answer from the cache equals one without
it: tests/test_batching.py's second turn."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from testkit.harness import Cluster, close_and_report

pytestmark = pytest.mark.model


def test_a_second_turn_goes_back_to_its_cache_and_prefills_only_the_new_tokens(
        tmp_path: Path, models_dir: Path, request: pytest.FixtureRequest) -> None:
    c = Cluster(tmp_path, env={"MLX_STACK_MODELS_DIR": str(models_dir)})
    try:
        c.broker()
        for node in ("node-a", "node-b"):
            c.worker("--model", "default=twin", node=node)
        url = c.gateway(node="node-c")  # both workers remote: no local preference
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                               timeout=180)

        def ask(model: str, history: list[dict[str, str]]) -> tuple[str, str]:
            """(worker, text) of one answer at temperature 0."""
            reply = client.chat.completions.with_raw_response.create(
                model=model, messages=history, max_tokens=12, temperature=0)
            return (reply.headers["x-mlx-stack-worker"],
                    reply.parse().choices[0].message.content or "")

        histories = [[{"role": "system", "content": " ".join(
            f"Rule {i} of agent {agent}: answer briefly about {topic}." for i in range(25))},
                      {"role": "user", "content": f"What is {topic}?"}]
                     for agent, topic in enumerate(("the sea", "a garden"))]
        home = {}
        for agent, history in enumerate(histories):
            home[agent], text = ask("twin", history)
            history += [{"role": "assistant", "content": text},
                        {"role": "user", "content": "Tell me one more thing."}]
        # Without the cache term the ties rotate: the two first turns spread, and each
        # second turn would land on the other worker.
        assert len(set(home.values())) == 2, home

        def jobs_done(worker_id: str, at_least: int) -> dict[str, int]:
            return c.counters_when(lambda w: w.load.counters.get("jobs_done", 0) >= at_least,
                                   worker_id)

        for agent, history in enumerate(histories):
            before = jobs_done(home[agent], 1)
            worker, _ = ask("twin", history)
            assert worker == home[agent], f"agent {agent}'s second turn moved"
            after = jobs_done(worker, before["jobs_done"] + 1)
            prefilled = after["prompt_tokens_prefilled"] - before["prompt_tokens_prefilled"]
            assert prefilled < 40, (agent, prefilled)
    finally:
        close_and_report(c, request.node)
