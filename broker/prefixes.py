"""What one worker's prompt cache probably holds: the prefix chains (gateway/prefix.py)
of the jobs dispatched to it, most recent last, as many as its cache keeps entries.

An approximation, on purpose: the worker stores a finished sequence's KV cache (prompt
and answer) in an LRU of :data:`CACHE_ENTRIES` entries, each replacing the entries that
are its prefixes, and evicts by bytes too; the broker mirrors that from its own
dispatches, with no message per cache event (a job that fails leaves a wrong entry: its
next turn pays a prefill, as a miss does). A wrong guess costs a prefill, as a miss
does, never a wrong answer. Soft state: a worker that restarts registers anew with an
empty mirror, and a new coordinator starts with empty ones (load-only routing until the
mirrors fill again).
"""

from __future__ import annotations

import collections

CACHE_ENTRIES = 64
"""Entries a worker's prompt cache keeps (worker/mlx_engine.py ``PROMPT_CACHE_ENTRIES``)."""


class PrefixMirror:
    """The chains of the jobs given to one worker, least recent first."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries = entries
        self._chains: collections.OrderedDict[tuple[int, ...], None] = (
            collections.OrderedDict())
        self._blocks: collections.Counter[int] = collections.Counter()
        """How many kept chains hold each hash: a hash names its whole prefix, so a hash
        held is a prefix held."""

    def add(self, hashes: list[int]) -> None:
        """A job with prompt chain ``hashes`` runs here (its cache entry will be the newest)."""
        chain = tuple(hashes)
        if not chain:
            return
        if chain in self._chains:
            self._chains.move_to_end(chain)
            return
        for kept in [c for c in self._chains if chain[:len(c)] == c]:
            self._drop(kept)  # as the worker's cache drops an entry's stored prefixes
        self._chains[chain] = None
        self._blocks.update(chain)
        while len(self._chains) > self.entries:
            self._drop(next(iter(self._chains)))

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` some kept chain shares."""
        n = 0
        while n < len(hashes) and hashes[n] in self._blocks:
            n += 1
        return n

    def _drop(self, chain: tuple[int, ...]) -> None:
        del self._chains[chain]
        self._blocks.subtract(chain)
        for block in chain:
            if self._blocks[block] <= 0:
                del self._blocks[block]
