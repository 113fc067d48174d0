"""Bad input gets a clear OpenAI-format error, and nothing else breaks."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from mlx_stack.common.plain import MAX_DEPTH
from testkit.harness import Cluster, wait_for

LIMIT = 64 * 1024
MAX_MESSAGES = 8
MAX_STREAMS = 2


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway with small limits, set as settings are: environment and flags."""
    c = Cluster(tmp_path_factory.mktemp("errors"), env={
        "MLX_STACK_MAX_BODY_BYTES": str(LIMIT), "MLX_STACK_MAX_TOKENS_LIMIT": "1000"})
    try:
        c.broker()
        c.worker("--engine", "synthetic", "--model", "syn", "--slots", "8", "--rate", "100",
                 "--tool-parser", "json_tools")
        yield c.gateway("--max-messages", str(MAX_MESSAGES),
                        "--max-streams-per-client", str(MAX_STREAMS))
    finally:
        c.close()


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


GOOD = {"model": "syn", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.mark.parametrize("body, param", [
    ({**GOOD, "messages": "hi"}, "messages"),
    ({**GOOD, "messages": []}, "messages"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({**GOOD, "max_tokens": "ten"}, "max_tokens"),
    ({**GOOD, "max_tokens": 0}, "max_tokens"),
    ({**GOOD, "temperature": 9}, "temperature"),
    ({**GOOD, "stream": "yes"}, "stream"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({k: v for k, v in GOOD.items() if k != "model"}, "model"),
    ({k: v for k, v in GOOD.items() if k != "messages"}, "messages"),
])
def test_wrong_types_and_missing_fields_are_400(url: str, body: dict, param: str) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    error = assert_openai_error(response, 400, "invalid_value", param)
    assert param.split(".")[-1] in error["message"]


@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"model": "syn",}', b"\xff\xfe",
                                 b"\xf0\xbe"])
def test_malformed_json_is_400(url: str, raw: bytes) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(response, 400, "invalid_json")["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          None])
def test_a_body_not_sent_as_json_is_400(url: str, content_type: str | None) -> None:
    # What a browser's cross-site "simple" POST sends; curl -d too, without -H.
    headers = {"content-type": content_type} if content_type else {}  # raw: httpx sets none
    response = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(GOOD),
                          headers=headers)
    assert "Content-Type: application/json" in assert_openai_error(response, 400)["message"]
    ok = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(GOOD),
                    headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_json_that_is_not_an_object_is_400(url: str) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", json=[1, 2])
    assert_openai_error(response, 400)


@pytest.mark.parametrize("body, param", [
    ({**GOOD, "n": 2}, "n"),
    ({**GOOD, "top_logprobs": 2}, "top_logprobs"),
    ({**GOOD, "logit_bias": {"50": 2}}, "logit_bias"),
    ({**GOOD, "tool_choice": "required"}, "tool_choice"),
    ({**GOOD, "response_format": {"type": "json_schema",
                                  "json_schema": {"schema": {"type": "strng"}}}},
     "response_format"),
    ({**GOOD, "response_format": {"type": "xml"}}, "response_format"),
    ({**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
])
def test_unsupported_parameters_are_400(url: str, body: dict, param: str) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert_openai_error(response, 400, "unsupported_parameter", param)


@pytest.mark.parametrize("body, param", [
    ({"model": "syn", "prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"model": "syn", "prompt": "hi", "echo": True}, "echo"),
])
def test_unsupported_completion_parameters_are_400(url: str, body: dict, param: str) -> None:
    response = httpx.post(f"{url}/v1/completions", json=body)
    assert_openai_error(response, 400, param=param)


def test_max_tokens_over_the_limit_is_400(url: str) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", json={**GOOD, "max_tokens": 5000})
    assert_openai_error(response, 400, "invalid_value", "max_tokens")


def test_more_messages_than_the_limit_is_400(url: str) -> None:
    messages = [{"role": "user", "content": f"m{i}"} for i in range(MAX_MESSAGES + 1)]
    response = httpx.post(f"{url}/v1/chat/completions", json={**GOOD, "messages": messages})
    error = assert_openai_error(response, 400, "invalid_value", "messages")
    assert "MLX_STACK_MAX_MESSAGES" in error["message"]
    at_limit = {**GOOD, "messages": messages[:MAX_MESSAGES]}
    assert httpx.post(f"{url}/v1/chat/completions", json=at_limit).status_code == 200


def deep(depth: int) -> object:
    value: object = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(("extra", "code"), [
    ({"seed": 2**63}, "invalid_value"),
    ({"seed": -(2**70)}, "invalid_value"),
    ({"tools": [{"type": "function", "function": deep(100)}]}, "invalid_value"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"n": 2**64}]}]},
     "invalid_value"),
    # A lone surrogate (was a 500): not text at all, so the JSON parser refuses it.
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "invalid_json"),
])
def test_values_the_mesh_cannot_carry_are_400_not_a_hang(url: str, extra: dict,
                                                         code: str) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", timeout=10,  # \u-escaped JSON
                          content=json.dumps({**GOOD, **extra}),
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 400, code)


@pytest.mark.parametrize("raw", [b"[" * 20_000 + b"]" * 20_000,
                                 b'{"model": "syn", "temperature": NaN, "messages": []}'])
def test_json_python_parses_but_openai_does_not_is_400(url: str, raw: bytes) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", content=raw, timeout=10,
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_streams_per_client_are_limited_with_429(url: str) -> None:
    body = {**GOOD, "stream": True, "max_tokens": 1000}  # ~10 s each: open while we test
    with httpx.Client(timeout=30) as client, contextlib.ExitStack() as streams:
        for _ in range(MAX_STREAMS + 1):  # refused before streaming: they hold no slot
            lost = client.post(f"{url}/v1/chat/completions", json={**body, "model": "nope"})
            assert_openai_error(lost, 404, "model_not_found")
        for _ in range(MAX_STREAMS):
            opened = streams.enter_context(client.stream(
                "POST", f"{url}/v1/chat/completions", json=body))
            assert opened.status_code == 200
        refused = client.post(f"{url}/v1/chat/completions", json=body)
        error = assert_openai_error(refused, 429, "too_many_streams")
        assert error["type"] == "rate_limit_error"
        assert "MLX_STACK_MAX_STREAMS_PER_CLIENT" in error["message"]
        assert refused.headers["retry-after"] == "1"
        assert client.post(f"{url}/v1/chat/completions", json=GOOD).status_code == 200
    # The streams above were closed by the client: their slots are free again.
    with httpx.Client(timeout=30) as client:
        def stream_ok() -> bool:
            return client.post(f"{url}/v1/chat/completions",
                               json={**body, "max_tokens": 3}).status_code == 200

        wait_for("the closed streams to be released", stream_ok, timeout=10, every=0.2)


def test_oversize_body_is_413_declared_or_chunked(url: str) -> None:
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * (LIMIT + 10)}]}
    assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=big), 413,
                        "body_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"model": "syn", "messages": [{"role": "user", "content": "'
        for _ in range(LIMIT // 1024 + 2):
            yield b"y" * 1024
        yield b'"}]}'

    response = httpx.post(f"{url}/v1/chat/completions", content=chunks(),
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 413, "body_too_large")


def test_unknown_route_is_404_in_openai_shape(url: str) -> None:
    assert_openai_error(httpx.get(f"{url}/v1/nothing"), 404)


def test_service_still_serves_after_all_that(url: str) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", json=GOOD)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]




def test_a_client_that_leaves_while_sending_its_body_is_no_server_error(
        cluster: Cluster) -> None:
    """Half a body, then the connection closes: nothing to answer and nothing to log as
    an error (it was a 500 with a traceback in the gateway's log)."""
    url = cluster.gateway(healthy=False)  # no worker: a request is a 503 after the grace
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"mo")
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200  # it serves on
    (gateway,) = [p for p in cluster.procs if p.name.startswith("gateway")]
    assert "ERROR" not in gateway.output() and "status=500" not in gateway.output(), \
        gateway.output()


def test_a_bug_still_answers_in_openai_shape() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from mlx_stack.gateway import errors

    app = FastAPI()
    errors.install(app)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    response = TestClient(app, raise_server_exceptions=False).get("/bug")
    error = assert_openai_error(response, 500, "internal_error")
    assert error["type"] == "server_error" and "log" in error["message"]


def nest(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def tool(parameters: object) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


def test_nesting_is_measured_as_the_mesh_carries_it(url: str) -> None:
    """The tool's parameters sit 5 levels deep in a SUBMIT: 59 more levels are the most
    the protocol carries (64). One more is a 400 at once, not a job the broker drops."""
    ok = httpx.post(f"{url}/v1/chat/completions", timeout=10,
                    json={**GOOD, "tools": tool(nest(MAX_DEPTH - 5))})
    assert ok.status_code == 200, ok.text
    too_deep = httpx.post(f"{url}/v1/chat/completions", timeout=10,
                          json={**GOOD, "tools": tool(nest(MAX_DEPTH - 4))})
    assert_openai_error(too_deep, 400, "invalid_value")


def test_a_body_that_grows_past_a_frame_is_413_and_the_gateway_stays_up(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Under the default 4 MiB body limit, but each 4-byte `1e1,` is a 9-byte double in
    msgpack: the SUBMIT would exceed the broker's frame limit and cut the gateway off."""
    c = Cluster(tmp_path_factory.mktemp("frame"))
    try:
        c.broker()
        c.worker("--engine", "synthetic", "--model", "syn")
        url = c.gateway()
        floats = "[" + ",".join(["1e1"] * 1_000_000) + "]"
        raw = json.dumps({**GOOD, "tools": tool("PARAMS")}).replace('"PARAMS"', floats)
        assert len(raw) < 4 * 1024 * 1024
        big = httpx.post(f"{url}/v1/chat/completions", content=raw, timeout=30,
                         headers={"content-type": "application/json"})
        assert_openai_error(big, 413, "body_too_large")
        assert httpx.post(f"{url}/v1/chat/completions", json=GOOD, timeout=10).status_code == 200
        gateway = next(proc for proc in c.procs if proc.name.startswith("gateway"))
        assert "broker_lost" not in gateway.output()  # never cut off from the broker
    finally:
        c.close()
