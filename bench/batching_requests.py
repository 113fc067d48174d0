"""The client side of ``bench.batching``: one streamed chat completion as the client saw it
(:class:`Reply`), a burst of them at once, and coding agents' conversations that send the
whole history again every turn.

Why a module of its own: these are the requests both servers get alike; the phases that
time them and the summaries of their replies are ``bench.batching``'s.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from bench.batching_prompts import TURNS
from bench.batching_servers import Server
from testkit.sse import ChatStream, read_chat


@dataclass
class Reply:
    """One streamed chat completion as the client saw it (perf_counter seconds)."""

    sent: float
    end: float
    ttft: float | None
    text: str
    usage_tokens: int | None
    error: str | None = None


async def stream_chat(client: httpx.AsyncClient, server: Server,
                      messages: list[dict[str, str]], max_tokens: int,
                      timeout: float) -> Reply:
    """One streamed chat completion: its text, time to first content, the server's usage;
    what arrived until a failure (a refusal, an error event, a broken stream)."""
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    stream = ChatStream()
    error: str | None = None
    try:
        async with asyncio.timeout(timeout):
            await read_chat(client, server.url, body, into=stream)
        stream.check()
    except (httpx.HTTPError, RuntimeError, TimeoutError, ValueError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    return Reply(stream.sent, time.perf_counter(), stream.ttft, stream.text,
                 stream.usage.get("completion_tokens"), error)


def async_client(connections: int, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0),
                             limits=httpx.Limits(max_connections=connections + 2))


async def burst(server: Server, prompts: list[str], max_tokens: int,
                timeout: float) -> list[Reply]:
    async with async_client(len(prompts), timeout) as client:
        return list(await asyncio.gather(*(
            stream_chat(client, server, [{"role": "user", "content": p}], max_tokens, timeout)
            for p in prompts)))


async def conversation(client: httpx.AsyncClient, server: Server, agent: int, system: str,
                       turns: int, max_tokens: int, timeout: float) -> list[Reply]:
    """One agent: each turn sends the whole history and appends the streamed reply."""
    messages = [{"role": "system", "content": system}]
    replies: list[Reply] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": TURNS[(agent + turn) % len(TURNS)]})
        reply = await stream_chat(client, server, messages, max_tokens, timeout)
        replies.append(reply)
        if reply.error:
            break
        messages.append({"role": "assistant", "content": reply.text})
    return replies


async def agents_at_once(server: Server, systems: list[str], turns: int, max_tokens: int,
                         timeout: float) -> list[list[Reply]]:
    async with async_client(len(systems), timeout) as client:
        return list(await asyncio.gather(*(
            conversation(client, server, agent, system, turns, max_tokens, timeout)
            for agent, system in enumerate(systems))))
