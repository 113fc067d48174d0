"""The Responses API (``POST /v1/responses``) through clients no one here wrote: the
``openai`` SDK (text and function calls, streamed and not; the whole ordered event
lists), and every tool type Codex CLI sends (tests/test_agents.py runs the OpenAI Agents
SDK). The model is a synthetic worker that writes scripted output (``[[say]]``) in the
Qwen/Hermes tool-call format."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from mlx_stack.gateway.responses_request import ResponsesRequest
from testkit.harness import Cluster

WEATHER = [{"type": "function", "name": "get_weather", "description": "The weather now.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"], "additionalProperties": False}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SPAWN = {"type": "function", "name": "spawn_agent", "description": "Start a sub-agent.",
         "parameters": {"type": "object", "properties": {"message": {"type": "string"}}}}
SEND = {"type": "function", "name": "send_input", "parameters": {"type": "object"}}
MULTI_AGENT = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
               "tools": [SPAWN, SEND]}
CODEX_TOOLS = [*WEATHER, SEND, MULTI_AGENT, {"type": "web_search", "external_web_access": False},
               {"type": "custom", "name": "apply_patch", "description": "Edit files.",
                "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
               {"type": "local_shell"}, {"type": "mcp", "server_label": "x"}]
"""Every kind of tool Codex CLI and OpenAI's Responses API send: a function, a namespace
(one of its names taken at the top level), hosted tools, a custom and a local shell tool."""


def tool_call(name: str, **arguments: Any) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def stream(url: str, **body: Any) -> tuple[list[dict[str, Any]], httpx.Headers]:
    """A streamed response's events, checked to be numbered 0, 1, 2... and named alike in
    their ``event:`` lines, and its headers."""
    with httpx.stream("POST", f"{url}/v1/responses", json={**body, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        lines = list(response.iter_lines())
    names = [line[7:] for line in lines if line.startswith("event: ")]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert names == [e["type"] for e in events]
    return events, response.headers


def kinds(events: list[dict[str, Any]]) -> list[str]:
    """The events' types, a run of text deltas as one (how text is split into pieces may
    vary); any other event missing or added changes the list."""
    out: list[str] = []
    for event in events:
        if not (event["type"] == "response.output_text.delta" and out and out[-1] == event["type"]):
            out.append(event["type"])
    return out


TEXT_EVENTS = ["response.output_item.added", "response.content_part.added",
               "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]
START = ["response.created", "response.in_progress"]


@pytest.fixture(scope="module")
def url(module_cluster: Cluster) -> str:
    """One tooly node for the module: no test here kills or stops a worker."""
    cluster = module_cluster
    cluster.worker("--engine", "synthetic", "--model", "tooly", "--tool-parser", "json_tools")
    return cluster.gateway()


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


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


def test_the_events_of_a_text_answer_in_order(url: str) -> None:
    events, _ = stream(url, model="tooly", input="[[say]]Hello there.")
    assert kinds(events) == [*START, *TEXT_EVENTS, "response.completed"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    text_done, part_done, item_done, completed = events[-4:]
    assert deltas == text_done["text"] == part_done["part"]["text"] == "Hello there."
    assert item_done["item"]["status"] == "completed"
    assert completed["response"]["output"] == [item_done["item"]]


def test_the_events_of_a_function_call_in_order(url: str) -> None:
    events, _ = stream(url, model="tooly", input="[[say]]Let me look." + CALL, tools=WEATHER)
    assert kinds(events) == [*START, *TEXT_EVENTS, *CALL_EVENTS, "response.completed"]
    added, delta, done, item_done = events[-5:-1]
    assert added["item"] | {"arguments": delta["delta"], "status": "completed"} \
        == item_done["item"]
    assert json.loads(done["arguments"]) == {"city": "Paris"} and done["name"] == "get_weather"
    assert item_done["item"]["type"] == "function_call" and "namespace" not in item_done["item"]


@pytest.mark.parametrize("streamed", [False, True])
def test_an_answer_cut_by_its_limit_marks_its_last_item_incomplete(url: str,
                                                                   streamed: bool) -> None:
    """The message the limit cut, and a call it ended (a call cut short arrives as a call
    with what arguments were written, and ends the answer the same way)."""
    for script, limit, kind in (("x" * 50, 5, "message"), (CALL, len(CALL), "function_call")):
        body = {"model": "tooly", "input": "[[say]]" + script, "tools": WEATHER,
                "max_output_tokens": limit}
        if streamed:
            events, _ = stream(url, **body)
            assert events[-1]["type"] == "response.incomplete"
            items = [e["item"] for e in events if e["type"] == "response.output_item.done"]
            assert items == events[-1]["response"]["output"]
            response = events[-1]["response"]
        else:
            response = httpx.post(f"{url}/v1/responses", json=body, timeout=60).json()
        assert response["status"] == "incomplete"
        assert response["incomplete_details"] == {"reason": "max_output_tokens"}
        ((item),) = response["output"]
        assert item["type"] == kind and item["status"] == "incomplete"


def test_codex_tools_are_offered_as_functions_and_hosted_ones_left_out() -> None:
    """What the model is offered for each kind of tool (the prompt's tools)."""
    asked = ResponsesRequest(model="m", input="hi", tools=CODEX_TOOLS).to_chat()
    offered = [t["function"]["name"] for t in asked.chat.tools or []]
    assert offered == ["get_weather", "send_input", "apply_patch", "local_shell",
                       "spawn_agent", "multi_agent_v1.send_input"]
    assert asked.ignored == ["web_search", "mcp"]
    patch = asked.chat.tools[2]["function"]
    assert "start: /.+/" in patch["description"]
    assert patch["parameters"]["required"] == ["input"]


@pytest.mark.parametrize("streamed", [False, True])
def test_calls_come_back_as_the_items_of_their_tools(url: str, streamed: bool) -> None:
    script = "[[say]]" + "".join([
        tool_call("spawn_agent", message="go"), tool_call("multi_agent_v1.send_input"),
        tool_call("send_input"), tool_call("apply_patch", input="*** Begin Patch"),
        tool_call("local_shell", command=["ls", "-l"], workdir="/tmp")])
    body = {"model": "tooly", "input": script, "tools": CODEX_TOOLS}
    if streamed:
        events, headers = stream(url, **body)
        output = events[-1]["response"]["output"]
        custom = [e["type"] for e in events if e["type"].startswith("response.custom")]
        assert custom == ["response.custom_tool_call_input.delta",
                          "response.custom_tool_call_input.done"]
        assert [e["item"] for e in events if e["type"] == "response.output_item.done"] == output
    else:
        response = httpx.post(f"{url}/v1/responses", json=body, timeout=60)
        output, headers = response.json()["output"], response.headers
    assert headers["x-mlx-stack-tools-ignored"] == "web_search,mcp"
    spawn, inner_send, send, patch, shell = output
    assert (spawn["type"], spawn["name"], spawn["namespace"]) == (
        "function_call", "spawn_agent", "multi_agent_v1")
    assert json.loads(spawn["arguments"]) == {"message": "go"}
    assert (inner_send["name"], inner_send["namespace"]) == ("send_input", "multi_agent_v1")
    assert send["name"] == "send_input" and "namespace" not in send
    assert patch["type"] == "custom_tool_call" and patch["name"] == "apply_patch"
    assert patch["input"] == "*** Begin Patch" and patch["id"].startswith("ctc_")
    assert shell["type"] == "local_shell_call" and shell["id"].startswith("lsh_")
    assert shell["action"] == {"type": "exec", "command": ["ls", "-l"], "timeout_ms": None,
                               "working_directory": "/tmp", "env": {}, "user": None}
    assert all(item["status"] == "completed" for item in output)


def test_a_codex_history_is_accepted(client: openai.OpenAI) -> None:
    """The items Codex sends back: its calls and their outputs, reasoning, the record of
    a hosted web search; the next turn reads the last tool output."""
    history = [
        {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "You are a coding agent."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed",
         "action": {"type": "search", "query": "weather"}},
        {"type": "function_call", "name": "spawn_agent", "namespace": "multi_agent_v1",
         "arguments": "{}", "call_id": "call_1"},
        {"type": "function_call_output", "call_id": "call_1", "output": "agent 7"},
        {"type": "custom_tool_call", "name": "apply_patch", "input": "*** Begin Patch",
         "call_id": "call_2", "status": "completed"},
        {"type": "custom_tool_call_output", "call_id": "call_2", "output": "patched"},
        {"type": "local_shell_call", "call_id": "call_3", "status": "completed",
         "action": {"type": "exec", "command": ["ls"]}},
        {"type": "local_shell_call_output", "id": "call_3", "output": [
            {"type": "input_text", "text": "[[say]]All done."}]},
    ]
    response = client.responses.create(model="tooly", input=history, tools=CODEX_TOOLS)
    assert response.status == "completed" and response.output_text == "All done."
    asked = ResponsesRequest(model="m", input=history, tools=CODEX_TOOLS).to_chat().chat
    assert [m.role for m in asked.messages] == ["developer", "user", "assistant", "tool",
                                                "assistant", "tool", "assistant", "tool"]
    calls = [m.tool_calls[0]["function"] for m in asked.messages if m.tool_calls]
    assert [c["name"] for c in calls] == ["spawn_agent", "apply_patch", "local_shell"]
    assert json.loads(calls[1]["arguments"]) == {"input": "*** Begin Patch"}


def test_unknown_tools_and_items_are_refused_by_name(client: openai.OpenAI) -> None:
    for body, param in (({"tools": [{"type": "teleport"}]}, "tools.0"),
                        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0"),
                        ({"tool_choice": {"type": "web_search"}, "tools": CODEX_TOOLS},
                         "tool_choice")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(**{"model": "tooly", "input": "hi", **body})
        assert refused.value.body["param"] == param
