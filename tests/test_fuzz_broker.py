"""Property-based fuzzing of a real broker process: hostile frames on its port from raw
DEALER sockets while real requests go through a gateway and a synthetic worker.

The property: whatever arrives, the broker stays up, never fails inside a handler,
counts what it refuses, and serves every real request correctly during and after.
``FUZZ_EXAMPLES`` (default 2,500; 4,000 until the suite outgrew CI's 20 minutes) raises the
example count for a longer local run.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mlx_stack.common import messages as msgs
from mlx_stack.common import wire
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.worker.synthetic import next_token, word
from testkit.harness import Cluster, close_and_report, wait_for
from tests.fuzz_frames import TAGS, harmless, hostile_frames, nested

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2500"))
MODEL = f"syn-{uuid.uuid4().hex}"
"""Unguessable, so no mutated SUBMIT or READY can name it by chance."""


def expected_text(prompt: str, max_tokens: int) -> str:
    """What the synthetic engine answers to a one-message chat (see worker/synthetic)."""
    sequence = list(prompt.encode())
    out = []
    for _ in range(max_tokens):
        sequence.append(next_token(sequence))
        out.append(word(sequence[-1]))
    return "".join(out)


def check_one_request(client: httpx.Client, url: str, n: int) -> str | None:
    """Send one real request (plain or streamed); None if the answer is right."""
    prompt, max_tokens, stream = f"request {n} {uuid.uuid4().hex}", 1 + n % 6, n % 2 == 1
    body = {"model": MODEL, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}
    want = expected_text(prompt, max_tokens)
    response = client.post(f"{url}/v1/chat/completions", json=body)
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    if stream:
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        if events[-1:] != ["[DONE]"]:
            return f"stream did not end with [DONE]: {response.text[-300:]}"
        got = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                      for e in events[:-1])
    else:
        got = response.json()["choices"][0]["message"]["content"]
    return None if got == want else f"wrong text {got!r}, expected {want!r}"


class Traffic:
    """Real requests in a background thread, one after another, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    failure = check_one_request(client, self.url, self.done)
                except httpx.HTTPError as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                if failure:
                    self.failures.append(failure)
                self.done += 1


class Sockets:
    """Raw DEALERs on the broker port: one per protocol tag (so a sender keeps to its
    role), one that mixes tags, and fresh ones that send once (new identities)."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.ctx, self.endpoint = ctx, endpoint
        self.by_tag = {tag: self._open() for tag in TAGS}
        self.mixed = self._open()
        self.sent = 0

    def _open(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 1000)
        sock.connect(self.endpoint)
        return sock

    def send(self, frames: list[bytes], via: str) -> None:
        if via == "fresh":
            sock = self._open()
        elif via == "own" and frames[0] in self.by_tag:
            sock = self.by_tag[frames[0]]
        else:
            sock = self.mixed
        try:
            sock.send_multipart(frames)
            self.sent += 1
        except zmq.Again:  # the broker cut this connection (oversize frame): reconnecting
            pass
        if via == "fresh":
            sock.close(0)
        for other in [*self.by_tag.values(), self.mixed]:  # what the broker answers
            while other.poll(0):
                other.recv_multipart()

    def close(self) -> None:
        for sock in [*self.by_tag.values(), self.mixed]:
            sock.close(0)


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, str]]:
    c = Cluster(tmp_path)
    try:
        c.broker()
        c.worker("--engine", "synthetic", "--model", MODEL, "--rate", "500")
        yield c, c.gateway()
    finally:
        close_and_report(c, request.node)


EXTREMES = [
    [wire.GATEWAY, bytes((msgs.Command.SUBMIT,)), b"\x91" * 5000 + b"\xc0"],  # deeper than msgpack
    [wire.GATEWAY, bytes((msgs.Command.CONTROL,)), b"\xdf\xff\xff\xff\xff"],  # claims 4G entries
    [wire.WORKER, bytes((msgs.Command.HEARTBEAT,)), b"\x00" * (wire.MAX_BODY_BYTES + 1)],
    [wire.WORKER, bytes((msgs.Command.HEARTBEAT,)), b"\x00" * (wire.MAX_BODY_BYTES + 4096)],  # cut
    wire.encode(wire.GATEWAY, msgs.Submit(job_id="deep", model="m", request=GenerationRequest(
        kind="chat", messages=[{"role": "user", "content": nested(500)}]))),
    [b""] * 200,
]
"""Hand-picked frames that random generation rarely builds: huge, deep, many-framed."""


def test_broker_survives_hostile_frames_while_serving(node: tuple[Cluster, str]) -> None:
    cluster, url = node
    (worker,) = cluster.workers()
    before = sum(cluster.control("status").rejected.values())
    broker = cluster.procs[0]
    sockets = Sockets(cluster.ctx, cluster.endpoint)
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(frames=hostile_frames, via=st.sampled_from(["own", "own", "mixed", "fresh"]))
    def throw(frames: list[bytes], via: str) -> None:
        sockets.send(harmless(frames), via)
        assert broker.alive(), "the broker died"

    try:
        with Traffic(url) as traffic:
            for frames in EXTREMES:
                sockets.send(frames, "fresh")
            throw()
            during = traffic.done
            wait_for("requests after the fuzzing", lambda: traffic.done >= during + 6)
    finally:
        sockets.close()
    status = cluster.control("status")
    rejected = status.rejected
    print(f"\n{sockets.sent} hostile messages in {time.monotonic() - started:.1f} s, "
          f"{traffic.done} real requests ({during} during), rejected: {rejected}")
    assert broker.alive()
    assert traffic.failures == [], traffic.failures[:5]
    assert during > 0, "no real request completed while the fuzzer ran"
    assert "handler_error" not in rejected, rejected
    assert sum(rejected.values()) - before >= sockets.sent // 2, rejected
    assert worker.worker_id in {w.worker_id for w in status.workers}
