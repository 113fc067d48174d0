"""What one worker's prompt cache probably holds: the prefix chains (gateway/prefix.py)
of the jobs dispatched to it, most recent last, as many as its cache keeps entries.

An approximation, on purpose: the worker stores a finished sequence's KV cache (prompt
and answer) in an LRU of :data:`CACHE_ENTRIES` entries, each replacing the entries that
are its prefixes, and evicts by bytes too; the broker mirrors that from its own
dispatches, with no message per cache event (a job that fails leaves a wrong entry: its
next turn pays a prefill, as a miss does). A wrong guess costs a prefill, as a miss
does, never a wrong answer.

A chain whose job still runs is not in the worker's cache yet (it stores a sequence's
cache when the sequence ends): it counts only for a prompt that extends it whole, its
conversation's next turn, which may reach the broker before the copy of the FINAL that
says the turn ended. Another prompt that shares only its start (every agent's system
prompt) finds nothing there until it ends; counted at once, it drew a burst of such
prompts onto one worker, which prefilled each of them in full anyway.

The worker corrects the guess from its side. Each RELEASE says how many prompt tokens its
cache served: a job routed for a match that the cache served (nearly) nothing of shows
that the chains which made the match were evicted there (by bytes, or by an LRU that
ordered otherwise), and they are dropped (:meth:`PrefixMirror.missed`). Each heartbeat
says how many entries the cache holds, and the mirror keeps no more ended chains than
that (:meth:`PrefixMirror.trim`).

Soft state: a worker that restarts registers anew with an empty mirror, and a new
coordinator starts with empty ones (load-only routing until the mirrors fill again).
"""

from __future__ import annotations

import collections
from collections.abc import Collection

CACHE_ENTRIES = 64
"""Entries a worker's prompt cache keeps (worker/mlx_engine.py ``PROMPT_CACHE_ENTRIES``)."""
MISS_TOKENS = 64
"""A job whose prompt the worker's cache served fewer tokens of than about one block of
gateway/prefix.py (256 characters) found none of the chains that matched it there."""


class PrefixMirror:
    """The chains of the jobs given to one worker, least recent first."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries = entries
        self._chains: collections.OrderedDict[tuple[int, ...], str] = (
            collections.OrderedDict())
        """Each chain with the id of the job that ran it last."""
        self._blocks: collections.Counter[int] = collections.Counter()
        """How many kept chains hold each hash: a hash names its whole prefix, so a hash
        held is a prefix held."""

    def add(self, hashes: list[int], job_id: str = "") -> None:
        """Job ``job_id`` with prompt chain ``hashes`` runs here (its cache entry will be
        the newest)."""
        chain = tuple(hashes)
        if not chain:
            return
        if chain in self._chains:
            self._chains[chain] = job_id
            self._chains.move_to_end(chain)
            return
        for kept in [c for c in self._chains if chain[:len(c)] == c]:
            self._drop(kept)  # as the worker's cache drops an entry's stored prefixes
        self._chains[chain] = job_id
        self._blocks.update(chain)
        while len(self._chains) > self.entries:
            self._drop(next(iter(self._chains)))

    def match(self, hashes: list[int], running: Collection[str] = ()) -> int:
        """How many leading blocks of ``hashes`` the worker's cache holds: as many as a
        chain of an ended job shares, or all of a chain of a job still ``running`` that
        ``hashes`` extends."""
        pending = [c for c, job in self._chains.items() if job in running]
        n = 0
        alike = pending  # those sharing hashes[:n]: a hash names its whole prefix, so
        # it stands at one place in any chain, and only these can hold hashes[n]
        while n < len(hashes):
            alike = [c for c in alike if n < len(c) and c[n] == hashes[n]]
            if self._blocks.get(hashes[n], 0) <= len(alike):
                break
            n += 1
        extended = [len(c) for c in pending if tuple(hashes[:len(c)]) == c]
        return max([n, *extended])

    def missed(self, hashes: list[int], job_id: str, running: Collection[str]) -> int:
        """The worker's cache served (nearly) nothing of job ``job_id``'s prompt, chain
        ``hashes``, that :meth:`match` credited: drop the chains that share its first
        block of jobs that had ended when it was looked up, which the cache evidently no
        longer holds. Those of jobs still ``running`` are not in it yet, and a job that
        ended after this one was given out (its chain now stands after this one's: see
        :meth:`ended`) may have been stored after the lookup. Without this job's own
        chain (its conversation's next turn replaced it) nothing says which ended
        before: nothing drops. Returns how many dropped."""
        chains = list(self._chains.items())
        at = next((i for i, (_, job) in enumerate(chains) if job == job_id), None)
        if at is None:
            return 0
        gone = [c for c, job in chains[:at]
                if job not in running and c[:1] == tuple(hashes[:1])]
        for chain in gone:
            self._drop(chain)
        return len(gone)

    def ended(self, job_id: str) -> None:
        """Job ``job_id`` ended: the worker's cache stores its sequence now, as its newest
        entry (mlx-lm's LRU orders entries by when they were stored; a lookup does not
        refresh them), so its chain moves to the end, where :meth:`trim` drops last."""
        chain = next((c for c, job in self._chains.items() if job == job_id), None)
        if chain is not None:
            self._chains.move_to_end(chain)

    def trim(self, entries: int, running: Collection[str]) -> int:
        """The worker's cache holds ``entries`` entries: keep at most as many chains of
        ended jobs, the most recent (the cache evicts the least recently used first).
        Returns how many dropped."""
        ended = [c for c, job in self._chains.items() if job not in running]
        gone = ended[:max(len(ended) - entries, 0)]
        for chain in gone:
            self._drop(chain)
        return len(gone)

    def _drop(self, chain: tuple[int, ...]) -> None:
        del self._chains[chain]
        self._blocks.subtract(chain)
        for block in chain:
            if self._blocks[block] <= 0:
                del self._blocks[block]
