"""What prefix of a prompt each instance holds in its KV cache, for cache-aware placement.

Two sources, one index (the same keys: backends/prefix.py's chained block hashes):
* precise: the engine's own events (blocks stored and removed), carried in its load report;
* approximate: what was routed where (the SGLang router's method, over blocks instead of
  characters), each entry living `ttl_s` unless refreshed, at most `max_blocks` per instance;
  on an engine that reports its blocks, only until its events can have said so (`pending_s`).
An instance's blocks are kept in LRU order; a lookup walks the request's chain and stops at the
first block the instance does not hold (only a consecutive prefix can be reused)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class _Blocks:
    # hash -> expiry (approximate entries) or None (reported by the engine: lives until removed)
    entries: OrderedDict[int, float | None] = field(default_factory=OrderedDict)
    precise: bool = False  # the engine reports its blocks: routed guesses live only `pending_s`
    pending: OrderedDict[int, float] = field(default_factory=OrderedDict)  # those guesses: hash -> expiry


class PrefixIndex:
    def __init__(self, ttl_s: float = 120.0, max_blocks: int = 1 << 16, pending_s: float = 30.0) -> None:
        self.ttl_s = ttl_s
        self.pending_s = pending_s
        self.max_blocks = max_blocks
        self._by_instance: dict[str, _Blocks] = {}

    # ---- lookups --------------------------------------------------------------------------------
    def match(self, instance_id: str, hashes: Sequence[int], now: float) -> int:
        """Leading blocks of `hashes` the instance holds (refreshing their recency)."""
        blocks = self._by_instance.get(instance_id)
        if blocks is None:
            return 0
        entries, pending = blocks.entries, blocks.pending
        n = 0
        for h in hashes:
            expiry = entries.get(h, 0.0)
            if expiry is None or expiry > now:
                entries.move_to_end(h)
            elif pending.get(h, 0.0) <= now:
                break
            n += 1
        return n

    def occupancy(self, instance_id: str) -> int:
        blocks = self._by_instance.get(instance_id)
        return len(blocks.entries) if blocks is not None else 0

    # ---- approximate: routed requests -----------------------------------------------------------
    def routed(self, instance_id: str, hashes: Iterable[int], now: float) -> None:
        """The request's prompt was sent there: its blocks will be there soon. Where the engine
        reports its own blocks (the truth), the guess only bridges the time until its events
        arrive (`pending_s`: the prefill and a poll), so a session's next turn finds its history."""
        blocks = self._by_instance.setdefault(instance_id, _Blocks())
        if blocks.precise:
            pending = blocks.pending
            for h in hashes:
                if h not in blocks.entries:  # what the engine reported stays until it says removed
                    pending[h] = now + self.pending_s
                    pending.move_to_end(h)
            while pending and (len(pending) > self.max_blocks or next(iter(pending.values())) <= now):
                pending.popitem(last=False)
            return
        expiry = now + self.ttl_s
        for h in hashes:
            blocks.entries[h] = expiry
            blocks.entries.move_to_end(h)
        self._bound(blocks, now)

    # ---- precise: engine events -----------------------------------------------------------------
    def stored(self, instance_id: str, hashes: Iterable[int]) -> None:
        blocks = self._by_instance.setdefault(instance_id, _Blocks())
        blocks.precise = True
        for h in hashes:
            blocks.entries[h] = None
            blocks.entries.move_to_end(h)
            blocks.pending.pop(h, None)

    def removed(self, instance_id: str, hashes: Iterable[int]) -> None:
        blocks = self._by_instance.get(instance_id)
        if blocks is not None:
            for h in hashes:
                blocks.entries.pop(h, None)
                blocks.pending.pop(h, None)

    def reset(self, instance_id: str, hashes: Iterable[int] = ()) -> None:
        """The engine's cache as a whole (after a gap in its events, a restart or a role change).
        Guesses for prompts routed there and not yet reported stay (until they expire): the
        snapshot can predate their prefill."""
        old = self._by_instance.get(instance_id)
        fresh = _Blocks(precise=True)
        if old is not None:
            fresh.pending = old.pending
        self._by_instance[instance_id] = fresh
        self.stored(instance_id, hashes)

    def apply(self, instance_id: str, reset: bool, stored: Iterable[int], removed: Iterable[int]) -> None:
        """An engine's events since the last poll (or its whole cache, `reset`)."""
        if reset:
            self.reset(instance_id, stored)
            return
        self.removed(instance_id, removed)
        self.stored(instance_id, stored)

    def forget(self, instance_id: str) -> None:
        self._by_instance.pop(instance_id, None)

    def _bound(self, blocks: _Blocks, now: float) -> None:
        entries = blocks.entries
        while len(entries) > self.max_blocks:
            entries.popitem(last=False)
        # Expired entries at the LRU end go first; the rest expire lazily at lookup.
        while entries:
            h, expiry = next(iter(entries.items()))
            if expiry is None or expiry > now:
                break
            del entries[h]
