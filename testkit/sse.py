"""The one reader of a streamed chat completion, for the tests and the benchmarks.

Every test and benchmark that streams reads the same thing: Server-Sent Events of
``data: {chunk}`` lines ending with ``data: [DONE]``, from our gateway, LiteLLM's proxy,
mlx-lm's server or the HTTP baseline. :class:`ChatStream` keeps what arrived and when;
the figures (text, time to first token, stalls, finish reasons, usage) are read from it,
so that a benchmark's "time to first token" and a test's "longest stall" are measured
the same way. It fills as the lines arrive: a test may look at it while it is read on
another thread (:class:`BackgroundStream`) or task.

Every time is ``time.perf_counter()`` seconds (the clock ``time.monotonic()`` reads too,
on Linux and macOS).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from testkit.harness import wait_for

CHAT_PATH = "/v1/chat/completions"


class Signal(Protocol):
    """What a reader sets when something happens: an asyncio or a threading Event."""

    def set(self) -> None: ...


class StreamFailed(RuntimeError):
    """The response was not a 200, or carried an error event."""


def chat_body(content: str, max_tokens: int, model: str = "syn", usage: bool = True,
              **more: Any) -> dict[str, Any]:
    """A streamed chat request of one user message ``content`` (the synthetic engine's
    prompt); ``usage``: ask for the usage chunk at the end."""
    return {"model": model, "max_tokens": max_tokens, "stream": True,
            **({"stream_options": {"include_usage": True}} if usage else {}),
            "messages": [{"role": "user", "content": content}], **more}


def content_of(chunk: dict[str, Any]) -> str:
    """The text a chunk adds (every choice's delta; "" for usage and error events)."""
    return "".join((choice.get("delta") or {}).get("content") or ""
                   for choice in chunk.get("choices") or [])


@dataclass
class ChatStream:
    """One streamed chat completion as its client received it, so far."""

    sent: float = 0.0
    """When the request left."""
    ended: float | None = None
    """When the response was over (read to its end, or broken)."""
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    refusal: str = ""
    """The start of the body of a response that was not a 200."""
    chunks: list[dict[str, Any]] = field(default_factory=list)
    """Every ``data:`` event but ``[DONE]``, error events included."""
    arrivals: list[float] = field(default_factory=list)
    """When each of :attr:`chunks` arrived."""
    dones: int = 0
    """How many ``data: [DONE]`` arrived (one, in a stream that ended well)."""

    def feed(self, line: str) -> dict[str, Any] | None:
        """Take in one line of the response; the chunk it carried, if any. Blank lines,
        ``:`` comments (keep-alives) and other fields are skipped."""
        if not line.startswith("data:"):
            return None
        now = time.perf_counter()
        data = line[5:].removeprefix(" ")
        if data == "[DONE]":
            self.dones += 1
            return None
        chunk = json.loads(data)
        self.chunks.append(chunk)
        self.arrivals.append(now)
        return chunk

    @property
    def done(self) -> bool:
        """``[DONE]`` arrived."""
        return self.dones > 0

    @property
    def text(self) -> str:
        return "".join(content_of(c) for c in self.chunks)

    @property
    def content_arrivals(self) -> list[float]:
        """When each chunk that added text arrived."""
        return [t for c, t in zip(self.chunks, self.arrivals, strict=False) if content_of(c)]

    @property
    def ttft(self) -> float | None:
        """Seconds from sending to the first text (None: no text came)."""
        firsts = self.content_arrivals[:1]
        return firsts[0] - self.sent if firsts else None

    @property
    def seconds(self) -> float:
        """Seconds from sending to the end of the response."""
        return (self.ended or time.perf_counter()) - self.sent

    @property
    def longest_gap(self) -> float:
        """The longest wait between two chunks, in seconds: how long a failover held
        the stream."""
        return max((b - a for a, b in itertools.pairwise(self.arrivals)), default=0.0)

    @property
    def finish_reasons(self) -> list[str]:
        return [choice["finish_reason"] for c in self.chunks
                for choice in c.get("choices") or [] if choice.get("finish_reason")]

    @property
    def usage(self) -> dict[str, Any]:
        """The last usage chunk's figures ({} if none came)."""
        return next((c["usage"] for c in reversed(self.chunks) if c.get("usage")), {})

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [c["error"] for c in self.chunks if "error" in c]

    @property
    def node(self) -> str:
        """The node that served it (our gateway's ``x-mlx-stack-node``)."""
        return self.headers.get("x-mlx-stack-node", "")

    def check(self) -> ChatStream:
        """Itself, if it was a 200 with no error event; else raise :class:`StreamFailed`."""
        if self.status != 200:
            raise StreamFailed(f"HTTP {self.status}: {self.refusal}")
        if self.errors:
            raise StreamFailed(f"error event: {self.errors[0]}")
        return self


def _request(url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"method": "POST", "url": f"{url}{CHAT_PATH}", "json": {**body, "stream": True}}


async def read_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                    into: ChatStream | None = None, started: Signal | None = None,
                    flowing: Signal | None = None) -> ChatStream:
    """POST ``body`` to the chat completions of ``url`` (a base URL) and read the stream
    to its end into ``into`` (a new :class:`ChatStream` if None), which also holds what
    arrived when the read fails. ``started`` is set when the response's headers arrive,
    ``flowing`` at each chunk that adds text. Neither the status nor error events raise:
    :meth:`ChatStream.check`."""
    stream = into if into is not None else ChatStream()
    stream.sent = time.perf_counter()
    try:
        async with client.stream(**_request(url, body)) as response:
            stream.status, stream.headers = response.status_code, dict(response.headers)
            if started is not None:
                started.set()
            if response.status_code != 200:
                stream.refusal = (await response.aread())[:300].decode(errors="replace")
                return stream
            async for line in response.aiter_lines():
                if (chunk := stream.feed(line)) and flowing is not None and content_of(chunk):
                    flowing.set()
    finally:
        stream.ended = time.perf_counter()
    return stream


def read_chat_sync(client: httpx.Client, url: str, body: dict[str, Any],
                   into: ChatStream | None = None, started: Signal | None = None,
                   flowing: Signal | None = None) -> ChatStream:
    """:func:`read_chat` for a thread without an event loop."""
    stream = into if into is not None else ChatStream()
    stream.sent = time.perf_counter()
    try:
        with client.stream(**_request(url, body)) as response:
            stream.status, stream.headers = response.status_code, dict(response.headers)
            if started is not None:
                started.set()
            if response.status_code != 200:
                stream.refusal = response.read()[:300].decode(errors="replace")
                return stream
            for line in response.iter_lines():
                if (chunk := stream.feed(line)) and flowing is not None and content_of(chunk):
                    flowing.set()
    finally:
        stream.ended = time.perf_counter()
    return stream


class BackgroundStream(ChatStream):
    """A streamed chat completion to the synthetic engine, read on a thread while a test
    kills, stops and restarts what serves it, and looks at what arrived so far."""

    def __init__(self, url: str, content: str, max_tokens: int) -> None:
        super().__init__()
        self.url = url
        self.content = content
        self.max_tokens = max_tokens
        self.closed = False
        """The response ended (after ``[DONE]``, or after an error event)."""
        self.error: BaseException | None = None
        """Why the read broke off (a failed test reports it)."""
        self.first = threading.Event()
        """Set when the response's headers arrive (or the read broke off before)."""

    def start(self) -> BackgroundStream:
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        try:
            with httpx.Client(timeout=60) as client:
                read_chat_sync(client, self.url, chat_body(self.content, self.max_tokens),
                               into=self, started=self.first)
            self.closed = True
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.first.set()

    def wait(self, timeout: float = 60) -> None:
        """Until the response ends, then fail with its error event if it had one (the
        stream ends without ``[DONE]`` then), else if ``[DONE]`` never came."""
        wait_for(f"the stream {self.content!r} to end", lambda: self.closed or self.error,
                 timeout=timeout)
        assert self.error is None, self.error
        assert self.status == 200, (self.status, self.refusal)
        assert not self.errors, self.errors
        assert self.done, f"the stream ended without [DONE] after {self.text!r}"
