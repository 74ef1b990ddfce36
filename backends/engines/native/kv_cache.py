"""Paged KV pool: fixed-size blocks, reference counts, a prefix cache and per-request block tables.

The pool is two tensors per model, `k` and `v`, shaped [layers, num_blocks * block_size, kv_heads,
head_dim]; a token's *slot* is `block_id * block_size + offset`. A request owns a `BlockTable`
(the ordered list of its block ids); position `p` of the request lives at slot
`blocks[p // block_size] * block_size + p % block_size`. Block 0 is a zeroed null block that
padded reads point at.

Prefix caching (vLLM's automatic prefix caching): a FULL block whose K/V is computed is registered
under its chained hash (backends/prefix.py, namespaced by the model), so a later request with the
same prefix shares it (reference count + 1) instead of recomputing it. A block whose count drops to
0 goes to a free list but stays hittable: unhashed free blocks are handed out first, then cached
ones in LRU order, and only then is a cached block evicted (its hash dropped: a "removed" event).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from backends.base import KVEvents

BLOCK_SIZE = 16
EVENT_LOG = 10_000  # block events kept for load polls (KVEvents): an asker further behind gets a reset


def blocks_for(num_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return (num_tokens + block_size - 1) // block_size


@dataclass
class BlockTable:
    """The blocks one request owns, in position order; the leading `registered` are in the prefix
    cache (or were duplicates of a cached block when they filled)."""

    blocks: list[int] = field(default_factory=list)
    registered: int = 0

    @property
    def capacity(self) -> int:
        return len(self.blocks) * BLOCK_SIZE


class KVEventLog:
    """Sequence-numbered "stored"/"removed" block events in a bounded ring, so each load poller (an
    orchestrator replica) asks for what followed the last event it saw. Numbers start at the clock
    (seconds << 20), so a restarted worker's numbers run past its predecessor's: an asker holding
    the old worker's number gets a reset, never another worker's deltas."""

    def __init__(self, capacity: int = EVENT_LOG) -> None:
        self.seq = int(time.time()) << 20  # the latest event's number
        self._ring: deque[tuple[int, bool, int]] = deque(maxlen=capacity)  # (seq, stored?, hash)

    def append(self, stored: bool, block_hash: int) -> None:
        self.seq += 1
        self._ring.append((self.seq, stored, block_hash))

    def since(self, since: int, cached: Iterable[int]) -> KVEvents:
        """Net changes after event `since`; a reset with the whole cached set when the events in
        between are no longer kept, or `since` is not one of this log's numbers."""
        oldest = self._ring[0][0] if self._ring else self.seq + 1
        if not oldest - 1 <= since <= self.seq:
            return KVEvents(seq=self.seq, reset=True, stored=list(cached))
        stored: dict[int, None] = {}  # ordered sets: a hash stored then removed is only removed
        removed: dict[int, None] = {}
        for seq, is_store, h in reversed(self._ring):
            if seq <= since:
                break
            if h not in stored and h not in removed:  # walking backwards: the latest event per hash wins
                (stored if is_store else removed)[h] = None
        return KVEvents(seq=self.seq, stored=list(reversed(stored)), removed=list(reversed(removed)))


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
        block_size: int = BLOCK_SIZE,
        prefix_caching: bool = True,
    ) -> None:
        if block_size != BLOCK_SIZE:
            raise ValueError(f"block_size is fixed at {BLOCK_SIZE}")
        self.block_size = block_size
        self.num_blocks = max(1, num_tokens // block_size)  # usable blocks
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # Block 0 is the null block: zeroed, never handed out; padded reads point at it. Every
        # other slot is read only after it was written, so the rest of the pool can start
        # uninitialized (on CPU its pages stay unmapped until used: no resident memory for an
        # idle pool).
        shape = (num_layers, (self.num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=self.device)
        self.v = torch.empty(shape, dtype=dtype, device=self.device)
        self.k[:, :block_size].zero_()
        self.v[:, :block_size].zero_()
        self.prefix_caching = prefix_caching
        self._ref = [0] * (self.num_blocks + 1)
        self._hash: list[int | None] = [None] * (self.num_blocks + 1)
        self._by_hash: dict[int, int] = {}  # cached block of each hash (one copy; duplicates stay unhashed)
        self._free: deque[int] = deque(range(1, self.num_blocks + 1))  # unreferenced, unhashed
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, cached: LRU first
        self.events = KVEventLog()
        self.query_tokens = 0  # prompt tokens looked up, and found, since start (hit rate = ratio)
        self.hit_tokens = 0
        # KV imports allocate from another thread while the engine thread steps (engines/api.py import_kv),
        # and load polls read the event log from the HTTP thread; the scheduler holds this lock while
        # it plans, so its check-then-allocate stays atomic.
        self.lock = threading.RLock()

    # ---- sizing -------------------------------------------------------------------------
    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def total_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take: unreferenced ones, cached or not."""
        return len(self._free) + len(self._evictable)

    @property
    def free_tokens(self) -> int:
        return self.free_blocks * self.block_size

    @property
    def cached_blocks(self) -> int:
        return len(self._by_hash)

    @property
    def used_blocks(self) -> int:
        """Blocks some request references (0 when idle: nothing leaked)."""
        return self.num_blocks - self.free_blocks

    # ---- allocation ---------------------------------------------------------------------
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        """Unhashed free blocks first, then the least recently used cached ones (evicted)."""
        with self.lock:
            if num_blocks > self.free_blocks:
                raise MemoryError(f"KV pool full: need {num_blocks} blocks, {self.free_blocks} free")
            out = []
            for _ in range(num_blocks):
                if self._free:
                    block = self._free.popleft()
                else:
                    block, _ = self._evictable.popitem(last=False)
                    self._evict(block)
                self._ref[block] = 1
                out.append(block)
            return out

    def _evict(self, block: int) -> None:
        h = self._hash[block]
        if h is not None:
            self._hash[block] = None
            del self._by_hash[h]
            self.events.append(False, h)

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Tail first: a request's last blocks are evicted before
        its first ones, which more requests share."""
        with self.lock:
            for block in reversed(blocks):
                self._ref[block] -= 1
                if self._ref[block] > 0:
                    continue
                if self._hash[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None

    def ensure(self, table: BlockTable, num_tokens: int) -> bool:
        """Grow `table` to hold `num_tokens` positions. False (and no change) if the pool can't."""
        need = blocks_for(num_tokens, self.block_size) - len(table.blocks)
        if need <= 0:
            return True
        with self.lock:
            if need > self.free_blocks:
                return False
            table.blocks.extend(self.allocate(need))
        return True

    def release(self, table: BlockTable) -> None:
        with self.lock:
            self.free(table.blocks)
            table.blocks = []
            table.registered = 0

    # ---- prefix cache -------------------------------------------------------------------
    def match(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest run of leading `hashes` (no side effect: `share` them)."""
        if not self.prefix_caching:
            return []
        out = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def evictable_among(self, blocks: list[int]) -> int:
        """How many of `blocks` sharing them takes out of the free count (unreferenced ones)."""
        return sum(1 for b in blocks if self._ref[b] == 0)

    def share(self, blocks: list[int]) -> None:
        """Take a reference to each of `blocks` (cache hits)."""
        with self.lock:
            for block in blocks:
                if self._ref[block] == 0:
                    del self._evictable[block]
                self._ref[block] += 1

    def register(self, table: BlockTable, hashes: list[int], num_blocks: int) -> None:
        """Cache the table's blocks from `table.registered` up to `num_blocks` (full blocks whose K/V
        is computed), block i under `hashes[i]`. A block whose hash another block already holds
        stays unhashed."""
        end = min(num_blocks, len(hashes), len(table.blocks))
        if not self.prefix_caching:
            table.registered = max(table.registered, end)
            return
        with self.lock:
            for i in range(table.registered, end):
                block, h = table.blocks[i], hashes[i]
                if self._hash[block] is None and h not in self._by_hash:
                    self._hash[block] = h
                    self._by_hash[h] = block
                    self.events.append(True, h)
                table.registered = i + 1

    def count_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    def events_since(self, since: int) -> KVEvents:
        with self.lock:
            return self.events.since(since, self._by_hash)

    # ---- addressing ---------------------------------------------------------------------
    def slots(self, table: BlockTable, start: int, end: int) -> torch.Tensor:
        """Slot indices (int64, on the pool's device) of positions [start, end) of a request."""
        blocks = torch.tensor(table.blocks, dtype=torch.long)
        pos = torch.arange(start, end, dtype=torch.long)
        slots = blocks[pos // self.block_size] * self.block_size + pos % self.block_size
        return slots.to(self.device, non_blocking=True)

    # ---- export / import ----------------------------------------------------------------
    def read(self, table: BlockTable, num_tokens: int) -> torch.Tensor:
        """[layers, 2, tokens, kv_heads, head_dim] copy of a request's first `num_tokens` positions."""
        idx = self.slots(table, 0, num_tokens)
        return torch.stack([self.k[:, idx], self.v[:, idx]], dim=1)

    def write(self, table: BlockTable, data: torch.Tensor, start: int = 0) -> None:
        """Copy `data` ([layers, 2, tokens, kv_heads, head_dim]) into positions start.. of `table`."""
        num_tokens = data.shape[2]
        idx = self.slots(table, start, start + num_tokens)
        data = data.to(device=self.device, dtype=self.dtype)
        self.k[:, idx] = data[:, 0]
        self.v[:, idx] = data[:, 1]
