"""The Anthropic Messages API (``POST /v1/messages``) through clients no one here wrote:
the ``anthropic`` SDK (text, tool round trips, streamed and not) and Claude Code itself.
The model is a synthetic worker that writes scripted output (``[[say]]``) in the
Qwen/Hermes tool-call format; the tool's result carries the next turn's script."""

from __future__ import annotations

import http.server
import itertools
import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from testkit.harness import ROOT, Cluster, free_port

WEATHER = [{"name": "get_weather", "description": "The weather in a city now.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                             "required": ["city"]}}]
NAMES = "claude-*haiku*=plain;claude-gone=absent;claude-*=tooly"
"""The gateway's model-name mapping here: Claude Code's main model to the scripted one,
its small one to another, and one name to a model no worker serves."""
CLAUDE = ROOT / "tests" / "clients" / "node_modules" / ".bin" / "claude"


def call(name: str, **arguments: Any) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def scripted(cluster: Cluster, rate: float = 400.0) -> Any:
    return cluster.worker("--engine", "synthetic", "--model", "tooly", "--rate", str(rate),
                          "--tool-parser", "json_tools", "--context-length", "200000")


@pytest.fixture(scope="module")
def url(module_cluster: Cluster) -> str:
    """One node for the module's tests that kill nothing and change no setting."""
    cluster = module_cluster
    scripted(cluster, rate=0)  # no delay: an agent's long prompt may be said back
    cluster.worker("--engine", "synthetic", "--model", "plain")
    return cluster.gateway(env={"MLX_STACK_MODEL_NAMES": NAMES})


def client_for(url: str, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=60)


def sse(url: str, **body: Any) -> list[dict[str, Any]]:
    """A streamed message's events as they are on the wire, each checked to name its own
    type on its ``event:`` line (the SDK's iterator hides ``ping``)."""
    events = []
    with httpx.stream("POST", f"{url}/v1/messages", json={**body, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                event = json.loads(line[len("data: "):])
                assert event["type"] == kind
                events.append(event)
    return events


def kinds(events: list[Any]) -> list[str]:
    """Event types in order (wire dicts or the SDK's objects), a run of deltas of one
    block as one (their text is asserted on its own)."""
    names = []
    for e in events:
        kind = e["type"] if isinstance(e, dict) else e.type
        if kind == "content_block_delta":
            kind += ":" + (e["delta"]["type"] if isinstance(e, dict) else e.delta.type)
        names.append(kind)
    return [kind for kind, _ in itertools.groupby(names)]


def texts(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta"
                   and e["delta"]["type"] == "text_delta")


def test_a_text_message_streamed_or_not(url: str) -> None:
    client = client_for(url)
    whole = client.messages.create(model="tooly", max_tokens=100, system="Be brief.",
                                   messages=[{"role": "user", "content": "[[say]]Hello there."}])
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text == "Hello there."
    assert (whole.stop_reason, whole.stop_sequence, whole.role) == ("end_turn", None, "assistant")
    assert whole.usage.output_tokens == len("Hello there.") and whole.usage.input_tokens > 0
    assert whole.id.startswith("msg_") and whole.model == "tooly"
    events = sse(url, model="tooly", max_tokens=100, messages=[{"role": "user", "content": [
        {"type": "text", "text": "[[say]]Hi "}, {"type": "text", "text": "you."}]}])
    assert kinds(events) == ["message_start", "ping", "content_block_start",
                             "content_block_delta:text_delta", "content_block_stop",
                             "message_delta", "message_stop"]
    assert texts(events) == "Hi you." and events[0]["message"]["content"] == []
    assert events[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2]["usage"]["output_tokens"] == len("Hi you.")
    with client.messages.stream(model="tooly", max_tokens=100, messages=[
            {"role": "user", "content": "[[say]]Streamed."}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "Streamed." and final.usage.input_tokens > 0


def test_stop_sequences_and_max_tokens_are_stop_reasons(url: str) -> None:
    client = client_for(url)
    ask = [{"role": "user", "content": "[[say]]Hello world. Bye."}]
    stopped = client.messages.create(model="tooly", max_tokens=100, messages=ask,
                                     stop_sequences=["world", "zzz"], metadata={"user_id": "u1"},
                                     # sampling options, no longer in SDK 2.x's signature:
                                     extra_body={"top_k": 5, "top_p": 0.9, "temperature": 0.5})
    assert stopped.content[0].text == "Hello "
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "world")
    events = sse(url, model="tooly", max_tokens=3, messages=ask)
    assert events[-2]["delta"]["stop_reason"] == "max_tokens" and texts(events) == "Hel"


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_round_trip(url: str, stream: bool) -> None:
    """tool_use -> tool_result -> final text, as an agent loop runs it."""
    client = client_for(url)
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "[[say]]Let me look." + call("get_weather", city="Paris")}]

    def ask() -> anthropic.types.Message:
        if stream:
            with client.messages.stream(model="tooly", max_tokens=200, tools=WEATHER,
                                        messages=history) as events:
                return events.get_final_message()
        return client.messages.create(model="tooly", max_tokens=200, tools=WEATHER,
                                      messages=history)

    asked = ask()
    text, use = asked.content
    assert (text.type, text.text) == ("text", "Let me look.")
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert use.id.startswith("toolu_") and asked.stop_reason == "tool_use"
    history += [{"role": "assistant", "content": [b.model_dump() for b in asked.content]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": use.id,
                     "content": [{"type": "text", "text": "[[say]]It is sunny in Paris."}]}]}]
    final = ask()
    assert [(b.type, b.text) for b in final.content] == [("text", "It is sunny in Paris.")]
    assert final.stop_reason == "end_turn"


def test_a_streamed_tool_use_is_its_whole_event_sequence(url: str) -> None:
    events = sse(url, model="tooly", max_tokens=200, tools=WEATHER,
                 tool_choice={"type": "tool", "name": "get_weather"},
                 messages=[{"role": "user", "content": "[[say]]Looking."
                            + call("get_weather", city="Oslo")}])
    assert kinds(events) == [
        "message_start", "ping",
        "content_block_start", "content_block_delta:text_delta", "content_block_stop",
        "content_block_start", "content_block_delta:input_json_delta", "content_block_stop",
        "message_delta", "message_stop"]
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"]["type"]) for e in starts] == [
        (0, "text"), (1, "tool_use")]
    use = starts[1]["content_block"]
    assert (use["name"], use["input"]) == ("get_weather", {}) and use["id"].startswith("toolu_")
    (arguments,) = [e["delta"]["partial_json"] for e in events
                    if e["type"] == "content_block_delta" and e["index"] == 1]
    assert json.loads(arguments) == {"city": "Oslo"} and texts(events) == "Looking."
    assert [e["index"] for e in events if e["type"] == "content_block_stop"] == [0, 1]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_each_block_arrives_once_when_the_worker_dies_mid_stream(cluster: Cluster) -> None:
    workers = {}
    for _ in range(2):
        before = {w.worker_id for w in cluster.workers()}
        proc = scripted(cluster, rate=40)
        (worker_id,) = {w.worker_id for w in cluster.workers()} - before
        workers[worker_id] = proc
    client = client_for(cluster.gateway())
    script = ("[[say]]First " + call("get_weather", city="Rome") + " then " + "x" * 40
              + call("get_weather", city="Kyiv") + " done.")
    events = []
    with client.messages.with_streaming_response.create(
            model="tooly", max_tokens=500, tools=WEATHER, stream=True,
            messages=[{"role": "user", "content": script}]) as response:
        victim = workers[response.headers["x-mlx-stack-worker"]]
        for event in response.parse():
            events.append(event)
            if event.type == "content_block_stop" and event.index == 1:
                victim.kill(signal.SIGKILL)  # after the first call, before the rest
    assert kinds(events) == ["message_start"] + [  # the SDK hides ping
        "content_block_start", "content_block_delta:text_delta", "content_block_stop",
        "content_block_start", "content_block_delta:input_json_delta",
        "content_block_stop"] * 2 + [
        "content_block_start", "content_block_delta:text_delta", "content_block_stop",
        "message_delta", "message_stop"]
    calls = [json.loads(e.delta.partial_json)["city"] for e in events
             if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    text = "".join(e.delta.text for e in events
                   if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert calls == ["Rome", "Kyiv"] and text == "First  then " + "x" * 40 + " done."
    assert not victim.alive()
    assert any(r.outcome == "worker_lost" for r in cluster.control("routes", last=3))


def test_a_lost_stream_ends_with_an_error_event(cluster: Cluster) -> None:
    victim = scripted(cluster, rate=40)
    client = client_for(cluster.gateway(env={"MLX_STACK_MAX_RETRIES": "0"}))
    events = []
    with pytest.raises(anthropic.APIStatusError) as failed:
        for event in client.messages.create(model="tooly", max_tokens=500, stream=True,
                                            messages=[{"role": "user",
                                                       "content": "[[say]]" + "y" * 200}]):
            events.append(event)
            if len(events) == 4:
                victim.kill(signal.SIGKILL)
    assert kinds(events)[:2] == ["message_start", "content_block_start"]
    assert failed.value.body["error"]["type"] == "overloaded_error"


def test_model_names_map_for_every_api(url: str) -> None:
    client = client_for(url)
    answer = client.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=50,
                                    messages=[{"role": "user", "content": "[[say]]Mapped."}])
    assert answer.model == "tooly" and answer.content[0].text == "Mapped."
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "claude-opus-4", "messages": [{"role": "user", "content": "[[say]]Chat."}]})
    assert chat.status_code == 200 and chat.json()["model"] == "tooly"
    assert chat.json()["choices"][0]["message"]["content"] == "Chat."
    small = client.messages.create(model="claude-haiku-4-5", max_tokens=3,
                                   messages=[{"role": "user", "content": "hi"}])
    assert small.model == "plain"
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-gone", max_tokens=3,
                               messages=[{"role": "user", "content": "hi"}])
    assert "maps 'claude-gone' to 'absent'" in missing.value.body["error"]["message"]


def test_refusals_are_in_anthropics_shape(url: str) -> None:
    client = client_for(url)
    ask = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope", max_tokens=10, messages=ask)
    assert missing.value.body["type"] == "error"
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert "'nope' does not exist" in missing.value.body["error"]["message"]
    for bad in (b"{not json", json.dumps({"model": "tooly", "messages": ask}).encode(),
                json.dumps({"model": "tooly", "max_tokens": 5, "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {}}]}]}).encode()):
        refused = httpx.post(f"{url}/v1/messages", content=bad, timeout=30,
                             headers={"content-type": "application/json"})
        assert refused.status_code == 400, refused.text
        body = refused.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as image:
        client.messages.create(model="tooly", max_tokens=10, messages=[{"role": "user",
                               "content": [{"type": "image", "source": {}}]}])
    assert "'image'" in image.value.body["error"]["message"]
    assert "messages.0.content.0" in image.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as structured:  # reaches the worker:
        client.messages.create(model="tooly", max_tokens=10, messages=ask, output_config={
            "format": {"type": "json_schema", "schema": {"type": "object"}}})
    message = structured.value.body["error"]["message"]
    assert message.startswith("output_config.format: ") and "cannot constrain" in message


def test_x_api_key_is_a_key_and_limits_refuse_in_anthropics_shape(cluster: Cluster) -> None:
    scripted(cluster)
    url = cluster.gateway(env={"MLX_STACK_API_KEYS": "sesame", "MLX_STACK_MAX_MESSAGES": "2"})
    ask = [{"role": "user", "content": "[[say]]Open."}]
    answer = client_for(url, key="sesame").messages.create(model="tooly", max_tokens=10,
                                                           messages=ask)
    assert answer.content[0].text == "Open."
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client_for(url, key="wrong").messages.create(model="tooly", max_tokens=10,
                                                     messages=ask)
    assert refused.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.BadRequestError) as long:
        client_for(url, key="sesame").messages.create(model="tooly", max_tokens=10,
                                                      messages=ask * 3)
    assert long.value.body["error"]["type"] == "invalid_request_error"
    assert "MLX_STACK_MAX_MESSAGES" in long.value.body["error"]["message"]


def test_count_tokens_estimates_the_prompt(url: str) -> None:
    client = client_for(url)
    text = "word " * 400
    counted = client.messages.count_tokens(model="tooly", system="Be brief.", tools=WEATHER,
                                           messages=[{"role": "user", "content": text}])
    schema = len(json.dumps(WEATHER[0]["input_schema"], separators=(",", ":")))
    assert counted.input_tokens >= (len(text) + schema) // 4
    assert counted.input_tokens < (len(text) + schema) // 4 + 60


def test_top_k_reaches_the_sampler() -> None:
    """The mlx sampler keeps only the k most likely tokens (top_k=1: always the best)."""
    mx = pytest.importorskip("mlx.core")
    from mlx_stack.common.generation import GenerationRequest
    from mlx_stack.worker.mlx_engine import make_sampler

    logprobs = mx.log(mx.softmax(mx.array([[1.0, 3.0, 2.0, 0.5]]), axis=-1))
    drawn = {k: {int(make_sampler(GenerationRequest(kind="chat", top_k=k, seed=s))(
        logprobs).item()) for s in range(64)} for k in (1, 2)}
    assert drawn == {1: {1}, 2: {1, 2}}


class Recorder(http.server.ThreadingHTTPServer):
    """A loopback proxy in front of the gateway that notes every exchange's method, path
    and status: what Claude Code asked for, and whether anything was refused."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[tuple[str, str, int]] = []
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: streams pass

    def _forward(self) -> None:
        server = self.server
        assert isinstance(server, Recorder)
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "content-length", "connection")}
        with httpx.stream(self.command, server.upstream + self.path, content=body,
                          headers=headers, timeout=120) as answer:
            server.seen.append((self.command, self.path, answer.status_code))
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "connection",
                                       "content-encoding"):
                    self.send_header(key, value)
            self.end_headers()
            for chunk in answer.iter_bytes():
                self.wfile.write(chunk)
                self.wfile.flush()

    do_GET = do_POST = do_HEAD = _forward

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.skipif(not CLAUDE.exists(), reason="Claude Code is not installed: `make test` "
                    "installs it (npm ci in tests/clients)")
def test_claude_code_reads_a_file_and_answers(url: str, tmp_path: Path) -> None:
    """``claude -p`` as a user runs it against the mesh: its first turn (scripted by the
    prompt) calls its Read tool; the file's content scripts the answer it prints. Nothing
    may leave loopback (the proxy variables point at a dead port) and no request of its
    may be refused."""
    scratch, home = tmp_path / "scratch", tmp_path / "claude-home"
    scratch.mkdir()
    home.mkdir()
    notes = scratch / "notes.txt"
    notes.write_text("[[say]]The notes say: hello from the mesh.")
    recorder = Recorder(url)
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": recorder.url,
           "ANTHROPIC_API_KEY": "test", "DISABLE_AUTOUPDATER": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "HTTPS_PROXY": dead,
           "HTTP_PROXY": dead, "NO_PROXY": "127.0.0.1,localhost"}
    try:
        done = subprocess.run(
            [str(CLAUDE), "-p", "[[say]]" + call("Read", file_path=str(notes)),
             "--allowedTools", "Read"],
            cwd=scratch, env=env, capture_output=True, text=True, timeout=120)
    finally:
        recorder.shutdown()
        recorder.server_close()
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "The notes say: hello from the mesh." in done.stdout
    assert [status for *_, status in recorder.seen if status >= 400] == [], recorder.seen
    assert len([1 for _, path, _ in recorder.seen if path.startswith("/v1/messages")]) >= 2


@pytest.mark.model
def test_top_k_reaches_the_model(model_node: tuple[Cluster, str]) -> None:
    """``top_k: 1`` through the whole path (Messages -> chat -> the job -> the mlx
    sampler) leaves only the most likely token, so a hot sampler answers as a greedy one."""
    _, url = model_node
    client = client_for(url)
    ask = [{"role": "user", "content": "Name three colours."}]
    greedy = client.messages.create(model="standard", max_tokens=16, messages=ask,
                                    extra_body={"temperature": 0})
    for _ in range(2):
        hot = client.messages.create(model="standard", max_tokens=16, messages=ask,
                                     extra_body={"temperature": 1, "top_k": 1})
        assert hot.content[0].text == greedy.content[0].text
