"""The synthetic engine behind its own minimal HTTP server: the "direct" baseline of
``bench.routing overhead`` when clients would otherwise call a backend over HTTP (as the
LiteLLM comparison did). A raw ASGI app under uvicorn, as lean as an OpenAI-shaped
streaming server gets in Python: no framework, one SSE event per token.

    .venv/bin/python -m bench.http_backend --port 4300 --rate 50 --ttft 0.02 [--slots 32]

It serves at most ``--slots`` streams at once (more wait their turn, as on a worker), and
``GET /stats`` answers how many it has started: how a router spread its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvicorn

from mlx_stack.worker.synthetic import next_token, word

HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def make_app(rate: float, ttft: float, slots: int = 1024) -> Any:
    seats = asyncio.Semaphore(slots)
    started = [0]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/stats":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body",
                        "body": json.dumps({"started": started[0]}).encode()})
            return
        started[0] += 1
        async with seats:
            await stream(receive, send)

    async def stream(receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        prompt = "\n".join(m["content"] for m in request["messages"]).encode()
        sequence = list(prompt)
        envelope = {"id": "chatcmpl-direct", "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": request["model"]}

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            chunk = {**envelope, "choices": [{"index": 0, "delta": delta,
                                              "finish_reason": finish}]}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        due = time.monotonic() + ttft
        for _ in range(request["max_tokens"]):
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            token = next_token(sequence)
            sequence.append(token)
            await send({"type": "http.response.body", "body": event({"content": word(token)}),
                        "more_body": True})
            due += 1.0 / rate
        usage = {**envelope, "choices": [], "usage": {
            "prompt_tokens": len(prompt), "completion_tokens": request["max_tokens"],
            "total_tokens": len(prompt) + request["max_tokens"]}}
        await send({"type": "http.response.body", "body": event({}, "length") + b"data: "
                    + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n"})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--ttft", type=float, default=0.02)
    parser.add_argument("--slots", type=int, default=1024)
    args = parser.parse_args()
    uvicorn.run(make_app(args.rate, args.ttft, args.slots), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
