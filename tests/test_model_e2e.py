"""End to end with the real model: openai client -> gateway -> broker -> mlx-lm worker."""

from __future__ import annotations

import httpx
import openai
import pytest

from testkit.harness import Cluster, wait_for

pytestmark = pytest.mark.model
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(model_node: tuple[Cluster, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{model_node[1]}/v1", api_key="x", max_retries=0,
                         timeout=120)


def test_chat_not_streamed_answers_paris(client: openai.OpenAI) -> None:
    response = client.chat.completions.with_raw_response.create(
        model="standard", messages=QUESTION, temperature=0)
    completion = response.parse()
    assert "Paris" in completion.choices[0].message.content
    assert completion.model == "SmolLM2-135M-Instruct"
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage.prompt_tokens > 10 and usage.completion_tokens > 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert response.headers["x-mlx-stack-node"] == "node-a"
    assert response.headers["x-mlx-stack-worker"].startswith("node-a-SmolLM2")


def test_chat_streamed_answers_paris_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="fast", messages=QUESTION, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens > 10
    assert all(c.usage is None for c in chunks[:-1])
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert usage.completion_tokens >= len(content_chunks) > 0


def test_streamed_and_not_streamed_agree_at_temperature_0(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="standard", messages=QUESTION,
                                           temperature=0, max_tokens=24)
    streamed = client.chat.completions.create(model="standard", messages=QUESTION,
                                              temperature=0, max_tokens=24, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content


def test_completions_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="SmolLM2-135M-Instruct", temperature=0,
                                      prompt="The capital of France is", max_tokens=8)
    assert whole.object == "text_completion"
    assert "Paris" in whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8
    streamed = client.completions.create(model="fast", temperature=0, stream=True,
                                         prompt="The capital of France is", max_tokens=8)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_stop_sequence_and_max_tokens(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="fast", messages=QUESTION, temperature=0)
    text = whole.choices[0].message.content
    cut = text.index("Paris")
    stopped = client.chat.completions.create(model="fast", messages=QUESTION, temperature=0,
                                             stop=["Paris"])
    assert stopped.choices[0].message.content == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="fast", messages=QUESTION, temperature=0,
                                           max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 2


def test_penalties_are_applied(client: openai.OpenAI) -> None:
    def ask(**kw) -> str:
        return client.chat.completions.create(
            model="fast", temperature=0, max_tokens=48, **kw, messages=[
                {"role": "user", "content": "Repeat the word 'cat' many times."}],
        ).choices[0].message.content

    assert ask(frequency_penalty=2.0) != ask()


def test_seeded_sampling_is_reproducible_and_not_greedy(client: openai.OpenAI) -> None:
    def sample(seed: int | None, temperature: float = 1.0) -> str:
        return client.chat.completions.create(
            model="fast", messages=QUESTION, temperature=temperature, top_p=0.9, seed=seed,
            max_tokens=16).choices[0].message.content

    assert sample(1234) == sample(1234)
    assert len({sample(1234), sample(99), sample(None, temperature=0)}) == 3


def test_models_lists_id_and_tiers_with_the_context_length(client: openai.OpenAI) -> None:
    models = {m.id: m.model_dump() for m in client.models.list()}
    assert {"SmolLM2-135M-Instruct", "fast", "standard"} <= models.keys()
    assert models["fast"]["owned_by"] == "mlx-stack"
    assert models["fast"]["root"] == "SmolLM2-135M-Instruct"
    assert models["SmolLM2-135M-Instruct"]["tiers"] == ["fast", "standard"]
    # What aider and litellm size prompts by: the model's config.json says 8192.
    assert models["standard"]["context_length"] == models["standard"]["max_model_len"] == 8192
    assert client.models.retrieve("standard").id == "standard"


def test_client_disconnect_stops_generation(model_node: tuple[Cluster, str]) -> None:
    cluster, url = model_node
    # Counters come in heartbeats: take them from one sent with no job running.
    before = cluster.counters_when(lambda w: w.running == 0 and w.load.running == 0)
    max_tokens = 1000  # a cancel must land within a quarter of it, on a loaded machine too
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "model": "fast", "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story."}]}) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen >= 4:
                break
    # Closing the response disconnects the client mid-stream.

    def cancelled() -> dict | None:
        counters = cluster.workers()[0].load.counters
        gone = counters.get("jobs_cancelled", 0) > before.get("jobs_cancelled", 0)
        return counters if gone else None

    after = wait_for("the worker to cancel the job", cancelled, timeout=30)
    generated = after["tokens_generated"] - before.get("tokens_generated", 0)
    assert 3 <= generated < max_tokens / 4, generated


def test_worker_stops_cleanly_after_serving(tmp_path, models_dir) -> None:
    """SIGTERM after inference exits 0 (MLX's thread-local destructors once raced with
    interpreter finalization and aborted the process)."""
    c = Cluster(tmp_path, env={"MLX_STACK_MODELS_DIR": str(models_dir)})
    try:
        c.broker()
        worker = c.worker()
        url = c.gateway()
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "fast", "prompt": "Hello", "max_tokens": 3})
        assert response.status_code == 200
        assert worker.stop() == 0, worker.output()
    finally:
        c.close()
