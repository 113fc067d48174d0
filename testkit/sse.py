"""A streamed chat completion read on a thread (moved from tests/test_failover.py)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field

import httpx

from testkit.harness import wait_for


@dataclass
class Stream:
    """A streamed chat completion read on a thread, with what arrived so far."""

    url: str
    content: str
    max_tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[dict] = field(default_factory=list)
    done: bool = False
    """``[DONE]`` arrived."""
    closed: bool = False
    """The response ended (after ``[DONE]``, or after an error event)."""
    error: BaseException | None = None
    first: threading.Event = field(default_factory=threading.Event)
    arrivals: list[float] = field(default_factory=list)
    """When each chunk arrived (monotonic seconds)."""

    def start(self) -> Stream:
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        body = {"model": "syn", "max_tokens": self.max_tokens, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": self.content}]}
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                              timeout=60) as response:
                self.headers = dict(response.headers)
                self.first.set()
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.chunks.append(json.loads(line[6:]))
                        self.arrivals.append(time.monotonic())
            self.closed = True
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.first.set()

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in self.chunks if c.get("choices"))

    @property
    def longest_gap(self) -> float:
        """The longest wait between two chunks, in seconds: how long a failover held
        the stream."""
        return max((b - a for a, b in itertools.pairwise(self.arrivals)), default=0.0)

    def wait(self, timeout: float = 60) -> None:
        """Until the response ends, then fail with its error event if it had one (the
        stream ends without ``[DONE]`` then), else if ``[DONE]`` never came."""
        wait_for(f"the stream {self.content!r} to end", lambda: self.closed or self.error,
                 timeout=timeout)
        assert self.error is None, self.error
        errors = [c for c in self.chunks if "error" in c]
        assert not errors, errors
        assert self.done, f"the stream ended without [DONE] after {self.text!r}"
