"""Cache-aware routing end to end (real processes, synthetic workers): an agent's next
turn goes back to the worker whose prompt cache holds its history, through the
gateway's prefix chain and the broker's mirror of each worker's finished jobs."""

from __future__ import annotations

import openai

from testkit.harness import Cluster


def test_each_conversations_next_turns_go_to_the_worker_of_its_first(cluster: Cluster
                                                                      ) -> None:
    """Three agents with long, distinct system prompts, three turns each, one at a time,
    through a gateway on a third node. Both workers are equal at every turn, so without
    the cache term the ties would rotate, and with three agents each follow-up would
    land on the other worker."""
    for node in ("node-a", "node-b"):  # eight slots, as a real worker: the reply's slot
        cluster.worker("--engine", "synthetic", "--model", "syn", "--rate", "400",
                       "--slots", "8", node=node)  # may still look taken at the next turn
    url = cluster.gateway(node="node-c")  # both workers remote: no local preference
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    histories = {agent: [{"role": "system", "content": f"You are agent {agent}. " * 120}]
                 for agent in range(3)}
    home: dict[int, str] = {}
    for turn in range(3):
        for agent, history in histories.items():
            history.append({"role": "user", "content": f"Step {turn} of the task."})
            reply = client.chat.completions.with_raw_response.create(
                model="syn", messages=history, max_tokens=4)
            worker = reply.headers["x-mlx-stack-worker"]
            history.append({"role": "assistant",
                            "content": reply.parse().choices[0].message.content})
            if turn == 0:
                home[agent] = worker
            assert worker == home[agent], f"agent {agent}'s turn {turn} moved"
    assert len(set(home.values())) == 2  # the first turns spread over both workers
    routes = cluster.control("routes", last=9)
    follow_ups = [r for r in routes if len(r.candidates) == 2][-6:]
    assert len(follow_ups) == 6
    for route in follow_ups:  # the chosen worker held the history: ~1,200 characters
        (held,) = [c.cached for c in route.candidates if c.worker_id == route.worker_id]
        assert held > 2000, route
