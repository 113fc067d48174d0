"""Cache-aware routing's two pure halves: the gateway's prefix chain of a prompt
(gateway/prefix.py) and the broker's mirror of a worker's prompt cache
(broker/prefixes.py)."""

from __future__ import annotations

from mlx_stack.broker.prefixes import PrefixMirror
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.gateway.prefix import BLOCK_CHARS, MAX_BLOCKS, prefix_of

SYSTEM = {"role": "system", "content": "You are a careful coding agent. " * 40}
TOOLS = [{"type": "function", "function": {"name": "run", "parameters": {}}}]


def chat(*messages: dict, tools: list | None = None) -> GenerationRequest:
    return GenerationRequest(kind="chat", messages=list(messages), tools=tools)


def test_a_next_turn_extends_its_history_chain() -> None:
    first = prefix_of(chat(SYSTEM, {"role": "user", "content": "Fix the bug."}))
    second = prefix_of(chat(SYSTEM, {"role": "user", "content": "Fix the bug."},
                            {"role": "assistant", "content": "Done."},
                            {"role": "user", "content": "Now the tests."}))
    assert second.hashes[:len(first.hashes)] == first.hashes
    assert second.ends[:len(first.ends)] == first.ends
    assert len(second.hashes) == len(first.hashes) + 2
    assert first.ends[-1] > len(SYSTEM["content"])  # the messages as JSON, every character
    assert all(b - a <= BLOCK_CHARS for a, b in zip([0, *first.ends[:-1]], first.ends,
                                                    strict=True))


def test_blocks_break_at_every_message() -> None:
    """An edited last message changes only its own blocks."""
    one = prefix_of(chat(SYSTEM, {"role": "user", "content": "A"}))
    other = prefix_of(chat(SYSTEM, {"role": "user", "content": "B"}))
    assert one.hashes[:-1] == other.hashes[:-1] and one.hashes[-1] != other.hashes[-1]


def test_tools_and_kind_are_in_the_root() -> None:
    """They render before the messages: another tool list shares no block."""
    plain = prefix_of(chat(SYSTEM))
    tooled = prefix_of(chat(SYSTEM, tools=TOOLS))
    assert not set(plain.hashes) & set(tooled.hashes)
    text = prefix_of(GenerationRequest(kind="completion", prompt=SYSTEM["content"]))
    assert not set(plain.hashes) & set(text.hashes)


def test_a_long_history_is_hashed_up_to_the_cap() -> None:
    long = prefix_of(chat(*[{"role": "user", "content": "x" * 1000}] * 100))
    assert len(long.hashes) == MAX_BLOCKS and len(long.ends) == MAX_BLOCKS


def test_the_mirror_matches_leading_blocks_and_keeps_the_newest_entries() -> None:
    mirror = PrefixMirror(entries=2)
    mirror.add([1, 2, 3])
    assert mirror.match([1, 2, 3, 4]) == 3 and mirror.match([1, 2, 9]) == 2
    assert mirror.match([9, 2, 3]) == 0  # a hash names its whole prefix: none shared
    mirror.add([1, 2, 3, 4, 5])  # replaces its stored prefix, as the worker's cache does
    mirror.add([7, 8])
    assert mirror.match([1, 2, 3, 4, 5]) == 5  # two entries: both still kept
    mirror.add([10])
    assert mirror.match([1, 2]) == 0 and mirror.match([7, 8]) == 2  # the oldest went
