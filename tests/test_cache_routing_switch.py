"""``cache_routing = false`` end to end (real processes, synthetic workers with their
prompt cache): the broker then routes an agent's turns by load alone, and the workers'
own counters show what that costs."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from testkit.harness import Cluster, close_and_report, wait_for


@pytest.mark.parametrize("cache_routing", ["true", "false"])
def test_without_cache_routing_an_agents_turns_leave_its_cache(
        tmp_path: Path, request: pytest.FixtureRequest, cache_routing: str) -> None:
    """One agent, three turns, two equal idle workers, the gateway on a third node. On:
    every turn goes to the first turn's worker and each follow-up reuses its history
    from that worker's cache. Off: the equal scores take turns, so each follow-up lands
    on the other worker: the second turn finds nothing of its history there, the third
    only its first turn's prompt (the setting ignored: the turns stay, and reuse
    more)."""
    cluster = Cluster(tmp_path, env={"MLX_STACK_CACHE_ROUTING": cache_routing})
    try:
        cluster.broker()
        for node in ("node-a", "node-b"):
            cluster.worker("--engine", "synthetic", "--model", "syn", "--rate", "400",
                           "--slots", "8", node=node)
        url = cluster.gateway(node="node-c")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        history = [{"role": "system", "content": "You are a patient agent. " * 100}]
        served = []
        for turn in range(3):
            history.append({"role": "user", "content": f"Step {turn} of the task."})
            reply = client.chat.completions.with_raw_response.create(
                model="syn", messages=history, max_tokens=4)
            served.append(reply.headers["x-mlx-stack-worker"])
            history.append({"role": "assistant",
                            "content": reply.parse().choices[0].message.content})

        def all_turns_counted() -> int | None:
            counters = [w.load.counters for w in cluster.workers()]
            turns = sum(c.get("prompt_cache_hits", 0) + c.get("prompt_cache_misses", 0)
                        for c in counters)
            return sum(c.get("prompt_tokens_reused", 0) for c in counters) + 1 \
                if turns == 3 else None

        reused = wait_for("the workers' counters of three turns", all_turns_counted) - 1
        if cache_routing == "true":
            assert served[1] == served[0] and served[2] == served[0], served
            assert reused > 2 * 2500  # the 2,500-byte system prompt and more, twice
        else:
            assert served[1] != served[0] and served[2] != served[1], served
            assert 2500 < reused < 2600  # the third turn's: the first turn's prompt
    finally:
        close_and_report(cluster, request.node)
