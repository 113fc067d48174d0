"""The Responses API (``POST /v1/responses``) through clients no one here wrote: the
``openai`` SDK (text and function calls, streamed and not) and the OpenAI Agents SDK
running one agent with one tool to its final answer. The model is a synthetic worker
that writes scripted output (``[[say]]``) in the Qwen/Hermes tool-call format."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

from tests.harness import Cluster

WEATHER = [{"type": "function", "name": "get_weather", "description": "The weather now.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"], "additionalProperties": False}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def client(cluster: Cluster) -> openai.OpenAI:
    cluster.worker("--engine", "synthetic", "--model", "tooly", "--tool-parser", "json_tools")
    return openai.OpenAI(base_url=f"{cluster.gateway()}/v1", api_key="x", max_retries=0,
                         timeout=60)


def test_a_text_response_streamed_or_not(client: openai.OpenAI) -> None:
    whole = client.responses.create(model="tooly", input="[[say]]Hello there.",
                                    instructions="Be brief.")
    assert whole.status == "completed" and whole.output_text == "Hello there."
    assert whole.usage.output_tokens == len("Hello there.") and whole.id.startswith("resp_")
    with client.responses.stream(model="tooly", input=[
            {"role": "user", "content": [{"type": "input_text", "text": "[[say]]Hi you."}]}
    ]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == "Hi you." and final.status == "completed"
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    cut = client.responses.create(model="tooly", input="[[say]]" + "x" * 50,
                                  max_output_tokens=5)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_are_output_items(client: openai.OpenAI, stream: bool) -> None:
    if stream:
        with client.responses.stream(model="tooly", input="[[say]]Let me look." + CALL,
                                     tools=WEATHER) as events:
            response = events.get_final_response()
    else:
        response = client.responses.create(model="tooly", input="[[say]]Let me look." + CALL,
                                           tools=WEATHER)
    message, call = response.output
    assert message.type == "message" and response.output_text == "Let me look."
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")


def test_a_previous_response_id_is_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="tooly", input="hi", previous_response_id="resp_1")
    assert refused.value.body["param"] == "previous_response_id"


def test_an_agent_calls_its_tool_and_answers(client: openai.OpenAI) -> None:
    """The OpenAI Agents SDK, unchanged: definition -> tool call -> tool result -> final
    answer. The tool's result is itself a script, so the model's next turn says it."""
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        calls.append(city)
        return f"[[say]]It is sunny in {city}."

    set_tracing_disabled(True)
    agent = Agent(name="forecaster", instructions="Answer with the weather.",
                  tools=[get_weather],
                  model=OpenAIResponsesModel("tooly", openai.AsyncOpenAI(
                      base_url=str(client.base_url), api_key="x", max_retries=0)))
    result = asyncio.run(Runner.run(agent, "[[say]]" + CALL, max_turns=3))
    assert calls == ["Paris"]
    assert result.final_output == "It is sunny in Paris."
