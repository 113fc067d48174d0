"""Structured output (``response_format``) with real inference on the default model, and
through the official ``openai`` client: the answer is JSON that matches the schema, also
when the stream is resumed on another worker after its first one is SIGKILLed; a schema
the grammar library cannot compile, or an engine that cannot constrain, is a 400 that
names ``response_format``."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import openai
import pytest

from testkit.harness import Cluster, close_and_report
from tests.test_batching import client_for, start_worker

pytestmark = pytest.mark.model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16},
                    "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def person_format() -> dict[str, Any]:
    return {"type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
         request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, dict[str, Any]]]:
    """Two real workers of the default model, and a synthetic one (model ``syn``)."""
    c = Cluster(tmp_path_factory.mktemp("structured"),
                env={"MLX_STACK_MODELS_DIR": str(models_dir)})
    try:
        c.broker()
        procs = dict(start_worker(c)[::-1] for _ in range(2))
        c.worker("--engine", "synthetic", "--model", "syn")
        yield c, {"url": c.gateway(), "procs": procs}
    finally:
        close_and_report(c, request.node)


def test_json_schema_answers_match_the_schema_streamed_or_not(mesh) -> None:
    client = client_for(mesh[1]["url"])
    whole = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=ASK, temperature=0, max_tokens=80,
        response_format=person_format())
    text = whole.choices[0].message.content
    jsonschema_rs.validate(PERSON, json.loads(text))
    assert whole.choices[0].finish_reason == "stop"
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=ASK, temperature=0, max_tokens=80,
        response_format=person_format(), stream=True) if c.choices]
    assert "".join(parts) == text  # the same grammar, the same greedy path
    free = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=ASK, temperature=0, max_tokens=80)
    assert free.choices[0].message.content != text  # the constraint changed the answer


def test_json_object_is_a_json_object(mesh) -> None:
    answer = client_for(mesh[1]["url"]).chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=80, messages=ASK,
        response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("model", "schema", "says"), [
    ("SmolLM2-135M-Instruct", {"type": "strng"}, "Invalid type: strng"),
    ("SmolLM2-135M-Instruct", {"$ref": "#/$defs/nowhere"}, "does not exist"),
    ("syn", PERSON, "cannot constrain"),
])
def test_a_format_that_cannot_be_honoured_is_a_400_naming_it(mesh, model: str,
                                                             schema: dict, says: str,
                                                             stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client_for(mesh[1]["url"]).chat.completions.create(
            model=model, messages=ASK, max_tokens=8, stream=stream,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": schema}})
    assert refused.value.body["param"] == "response_format"
    assert says in refused.value.body["message"]


def test_a_constrained_stream_resumed_after_its_worker_is_killed_matches_the_schema(
        mesh) -> None:
    cluster, state = mesh
    client = client_for(state["url"])
    reference = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=ASK, temperature=0, max_tokens=80,
        response_format=person_format()).choices[0].message.content
    parts: list[str] = []
    killed = threading.Event()
    with client.chat.completions.with_streaming_response.create(
            model="SmolLM2-135M-Instruct", messages=ASK, temperature=0, max_tokens=80,
            response_format=person_format(), stream=True) as response:
        victim = state["procs"][response.headers["x-mlx-stack-worker"]]
        request_id = response.headers["x-request-id"]
        for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                if len(parts) == 4 and not killed.is_set():
                    victim.kill(signal.SIGKILL)
                    killed.set()
    assert killed.is_set() and not victim.alive()
    assert "".join(parts) == reference
    jsonschema_rs.validate(PERSON, json.loads(reference))
    # Resumed: the gateway submitted the request again after the kill (the coordinator
    # failed the job as worker_lost, or, when the worker died before its heartbeat told
    # of the output, ran it again from the start and the gateway resumed it instead).
    routes = cluster.control("routes", last=10)
    assert len({r.job_id for r in routes if r.request_id == request_id}) >= 2, routes


def test_each_token_has_its_logprob_and_the_most_likely_alternatives(mesh) -> None:
    client = client_for(mesh[1]["url"])
    ask = {"model": "SmolLM2-135M-Instruct", "messages": ASK, "temperature": 0,
           "max_tokens": 12, "logprobs": True, "top_logprobs": 3}
    answer = client.chat.completions.create(**ask)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 12
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for t in content:
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and tops[0] == t.logprob  # greedy
    streamed = [e for c in client.chat.completions.create(**ask, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(**{**ask, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_text_completions_give_legacy_logprobs(mesh) -> None:
    client = client_for(mesh[1]["url"])
    ask = {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is",
           "temperature": 0, "max_tokens": 8, "logprobs": 2}
    answer = client.completions.create(**ask)
    choice = answer.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == answer.usage.completion_tokens == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, logprob, tops in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                    strict=True):
        assert len(tops) == 2 and logprob <= 0 and tops[token] == logprob  # greedy
    streamed = [c.choices[0].logprobs for c in client.completions.create(**ask, stream=True)
                if c.choices[0].logprobs]
    assert [t for c in streamed for t in c.tokens] == lp.tokens
    assert [o for c in streamed for o in c.text_offset] == lp.text_offset
    assert client.completions.create(**{**ask, "logprobs": None}).choices[0].logprobs is None
    own = client.completions.create(**{**ask, "logprobs": 0}).choices[0].logprobs
    assert own.tokens == lp.tokens and own.top_logprobs == [{}] * len(lp.tokens)
