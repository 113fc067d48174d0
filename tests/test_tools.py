"""Tool calls through the official ``openai`` client.

The parsing path runs a synthetic worker that writes a given family's tool-call text
(Qwen/Hermes ``<tool_call>`` JSON, mlx-lm's ``json_tools`` parser) from a ``[[say]]``
script, also across a SIGKILL of the worker mid-stream. The template path runs real
inference on the default model, whose chat template renders tools (a Qwen2.5-style
template on SmolLM2's weights, which share its ChatML framing): a required call, its
result, and the model's final answer."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from testkit.harness import Cluster, Proc, wait_for

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}]


def call(name: str, **arguments: Any) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def say(*parts: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": "[[say]]" + "".join(parts)}]


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


@dataclass
class Tooly:
    cluster: Cluster
    client: openai.OpenAI
    procs: dict[str, Proc]
    """The ``tooly`` workers' processes by worker id."""


def start_tooly(cluster: Cluster) -> Tooly:
    """Two synthetic workers of model ``tooly`` that write json_tools calls, and one
    ``plain`` worker without a tool format."""
    procs = {}
    for _ in range(2):
        before = {w.worker_id for w in cluster.workers()}
        proc = cluster.worker("--engine", "synthetic", "--model", "tooly", "--rate", "40",
                              "--tool-parser", "json_tools")
        (worker_id,) = {w.worker_id for w in cluster.workers()} - before
        procs[worker_id] = proc
    cluster.worker("--engine", "synthetic", "--model", "plain")
    return Tooly(cluster, client_for(cluster.gateway()), procs)


@pytest.fixture(scope="module")
def tooly(module_cluster: Cluster) -> Tooly:
    """The module's tooly node, for the tests that kill nothing."""
    return start_tooly(module_cluster)


@pytest.fixture
def tooly_alone(cluster: Cluster) -> Tooly:
    """A tooly node of the test's own, for a test that kills a worker."""
    return start_tooly(cluster)


def test_a_tool_call_is_parsed_into_tool_calls(tooly) -> None:
    client = tooly.client
    answer = client.chat.completions.create(
        model="tooly", tools=WEATHER, messages=say("Checking.", call("get_weather", city="Paris")))
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    (made,) = choice.message.tool_calls
    assert made.type == "function" and made.function.name == "get_weather"
    assert json.loads(made.function.arguments) == {"city": "Paris"}
    assert made.id.startswith("call_")


def test_streamed_tool_calls_arrive_as_deltas_in_order(tooly) -> None:
    client = tooly.client
    chunks = list(client.chat.completions.create(
        model="tooly", tools=WEATHER, stream=True,
        messages=say("Two cities: ", call("get_weather", city="Oslo"), " and ",
                     call("get_weather", city="Lima"))))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert content == "Two cities:  and "
    assert [(d.index, json.loads(d.function.arguments)["city"]) for d in deltas] == [
        (0, "Oslo"), (1, "Lima")]
    assert len({d.id for d in deltas}) == 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_each_tool_call_arrives_once_when_the_worker_dies_between_them(
        tooly_alone: Tooly) -> None:
    client = tooly_alone.client
    script = ("First ", call("get_weather", city="Rome"), " then ", "x" * 40,
              call("get_weather", city="Kyiv"), " done.")
    deltas, content = [], []
    with client.chat.completions.with_streaming_response.create(
            model="tooly", tools=WEATHER, stream=True, messages=say(*script)) as response:
        victim = tooly_alone.procs[response.headers["x-mlx-stack-worker"]]
        for chunk in response.parse():
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta and delta.tool_calls:
                deltas += delta.tool_calls
                if len(deltas) == 1:
                    victim.kill(signal.SIGKILL)
            if delta and delta.content:
                content.append(delta.content)
    assert [(d.index, json.loads(d.function.arguments)["city"]) for d in deltas] == [
        (0, "Rome"), (1, "Kyiv")]
    assert "".join(content) == "First  then " + "x" * 40 + " done."
    assert not victim.alive()
    assert any(r.outcome == "worker_lost" for r in tooly_alone.cluster.control("routes", last=3))


def test_without_parallel_tool_calls_the_answer_ends_at_its_first_call(tooly) -> None:
    answer = tooly.client.chat.completions.create(
        model="tooly", tools=WEATHER, parallel_tool_calls=False,
        messages=say(call("get_weather", city="Oslo"), call("get_weather", city="Lima"),
                     " and more text"))
    (made,) = answer.choices[0].message.tool_calls
    assert json.loads(made.function.arguments) == {"city": "Oslo"}
    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.usage.completion_tokens < len(call("get_weather", city="Oslo")) + 8


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_by_max_tokens_is_a_call_with_its_partial_arguments(tooly,
                                                                       stream: bool) -> None:
    """OpenAI's way: ``finish_reason: length`` and the call as far as it was written;
    never the model's ``<tool_call>`` markup in the content."""
    said = "Checking. " + call("get_weather", city="Paris")
    script = say(said)
    cut = said.index('"P') + 2  # one byte a token
    request = dict(model="tooly", tools=WEATHER, messages=script, max_tokens=cut)
    if stream:
        chunks = list(tooly.client.chat.completions.create(**request, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        (made,) = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
        name, arguments = made.function.name, made.function.arguments
        finish = chunks[-1].choices[0].finish_reason
    else:
        answer = tooly.client.chat.completions.create(**request).choices[0]
        content, finish = answer.message.content, answer.finish_reason
        (made,) = answer.message.tool_calls
        name, arguments = made.function.name, made.function.arguments
    assert content == "Checking. "
    assert finish == "length"
    assert (name, arguments) == ("get_weather", '{"city": "P')


@pytest.mark.parametrize("stream", [False, True])
def test_langchain_binds_a_tool_calls_it_and_answers_with_its_result(tooly,
                                                                      stream: bool) -> None:
    """LangChain's ChatOpenAI parses the call with its own code, runs the tool and sends
    the result back as a ``tool`` message. The script's second turn is in the tool's
    result: the synthetic engine says what follows the prompt's last ``[[say]]``."""
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return f"[[say]]It is sunny in {city}."

    model = ChatOpenAI(model="tooly", base_url=str(tooly.client.base_url), api_key="x",
                       max_retries=0, timeout=60, streaming=stream)
    bound = model.bind_tools([get_weather])
    messages = [HumanMessage(say("Let me look. ", call("get_weather", city="Oslo"))[0]["content"])]
    asked = bound.invoke(messages)
    (made,) = asked.tool_calls
    assert (made["name"], made["args"]) == ("get_weather", {"city": "Oslo"})
    assert asked.content == "Let me look. "
    messages += [asked, get_weather.invoke(made)]
    final = bound.invoke(messages)
    assert final.content == "It is sunny in Oslo." and not final.tool_calls


@pytest.mark.parametrize("stream", [False, True])
def test_tools_for_a_model_without_tool_calling_are_a_400_naming_tools(tooly,
                                                                       stream: bool) -> None:
    client = tooly.client
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="plain", tools=WEATHER, stream=stream,
                                       messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["param"] == "tools"
    assert "no tool calling" in refused.value.body["message"]


@pytest.mark.model
def test_the_default_model_calls_a_tool_then_answers_with_its_result(model_node) -> None:
    cluster, url = model_node
    client = client_for(url)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    asked = client.chat.completions.create(model="standard", messages=ask, tools=WEATHER,
                                           tool_choice="required", temperature=0,
                                           max_tokens=60)
    (made,) = asked.choices[0].message.tool_calls
    assert made.function.name == "get_weather"
    assert set(json.loads(made.function.arguments)) == {"city"}
    assert asked.choices[0].finish_reason == "tool_calls"
    bare = client.chat.completions.create(model="standard", messages=ask, max_tokens=1)
    assert asked.usage.prompt_tokens > bare.usage.prompt_tokens + 40  # the tools rendered
    history = [*ask, asked.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": made.id, "content": "Sunny, 21 C"}]
    final = client.chat.completions.create(model="standard", messages=history,
                                           tools=WEATHER, temperature=0, max_tokens=40)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens > asked.usage.prompt_tokens  # the result rendered
    wait_for("nothing left running", lambda: all(w.running == 0 for w in cluster.workers()))
