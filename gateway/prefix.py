"""A request's prompt as a chain of prefix hashes, for cache-aware routing.

A worker keeps the KV cache of the prompts it computed (mlx-lm's prompt cache, exact on
token prefixes), so an agent's next turn, which resends its whole history, prefills only
its new tokens, on that worker. The broker sends a conversation back there if it can
tell which worker holds its prefix. The gateway has no tokenizer, and needs none: equal
message prefixes render to equal token prefixes with the chat templates that render
messages in order. So the prompt is cut into blocks, at every message and every
:data:`BLOCK_CHARS` characters within one, and each block's hash chains the one before
it: two requests share their first n hashes exactly when they share their first n
blocks. The broker remembers the chains of the jobs each worker finished
(broker/prefixes.py) and matches a new job's chain against them.

The root hash covers what renders before the messages and changes every token after it
(the tools, the kind of request); the model does not enter it, as a worker serves one
model. Each block's end (in characters, from the start of the prompt) goes with its
hash, so the broker can weigh a match by its length (a prefix of a few characters is no
reason to move a request).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mlx_stack.common.generation import GenerationRequest

BLOCK_CHARS = 256
"""Characters per block within a message (about 64 tokens): the grain of a match."""
MAX_BLOCKS = 256
"""Blocks hashed at most (64 KiB of prompt): past them a conversation is known anyway."""

_canonical = json.JSONEncoder(separators=(",", ":"), sort_keys=True,
                              ensure_ascii=False).encode


@dataclass(frozen=True, slots=True)
class Prefix:
    """The chain of a prompt: ``hashes[i]`` names its first ``i + 1`` blocks, which end
    ``ends[i]`` characters into it."""

    hashes: list[int]
    ends: list[int]


def _chained(previous: bytes, data: str) -> bytes:
    return hashlib.blake2b(previous + data.encode("utf-8", "surrogatepass"),
                           digest_size=8).digest()


def prefix_of(request: GenerationRequest) -> Prefix:
    """The prefix chain of ``request``'s prompt (its messages, or a completion's text)."""
    root = _canonical({"kind": request.kind, "tools": request.tools or []})
    pieces = [request.prompt] if request.kind == "completion" else [
        _canonical({k: m.get(k) for k in ("role", "content", "name", "tool_calls",
                                           "tool_call_id") if m.get(k) is not None})
        for m in request.messages]
    digest = _chained(b"", root)
    hashes: list[int] = []
    ends: list[int] = []
    end = 0
    for piece in pieces:
        for start in range(0, max(len(piece), 1), BLOCK_CHARS):
            if len(hashes) == MAX_BLOCKS:
                return Prefix(hashes, ends)
            block = piece[start:start + BLOCK_CHARS]
            digest = _chained(digest, block)
            end += len(block)
            hashes.append(int.from_bytes(digest, "big", signed=True))
            ends.append(end)
    return Prefix(hashes, ends)
