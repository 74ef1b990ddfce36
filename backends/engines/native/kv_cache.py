"""Paged KV pool: fixed-size blocks, a free-list allocator and per-request block tables.

The pool is two tensors per model, `k` and `v`, shaped [layers, num_blocks * block_size, kv_heads,
head_dim]; a token's *slot* is `block_id * block_size + offset`. A request owns a `BlockTable`
(the ordered list of its block ids); position `p` of the request lives at slot
`blocks[p // block_size] * block_size + p % block_size`. Block 0 is a zeroed null block that
padded reads point at.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

BLOCK_SIZE = 16


def blocks_for(num_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return (num_tokens + block_size - 1) // block_size


@dataclass
class BlockTable:
    """The blocks one request owns, in position order."""

    blocks: list[int] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return len(self.blocks) * BLOCK_SIZE


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
        self._free: deque[int] = deque(range(1, self.num_blocks + 1))
        # KV imports allocate from another thread while the engine thread steps (engines/api.py import_kv);
        # the scheduler holds this lock while it plans, so its check-then-allocate stays atomic.
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
        return len(self._free)

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.block_size

    # ---- allocation ---------------------------------------------------------------------
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        with self.lock:
            if num_blocks > len(self._free):
                raise MemoryError(f"KV pool full: need {num_blocks} blocks, {len(self._free)} free")
            return [self._free.popleft() for _ in range(num_blocks)]

    def free(self, blocks: list[int]) -> None:
        with self.lock:
            self._free.extend(blocks)

    def ensure(self, table: BlockTable, num_tokens: int) -> bool:
        """Grow `table` to hold `num_tokens` positions. False (and no change) if the pool can't."""
        need = blocks_for(num_tokens, self.block_size) - len(table.blocks)
        if need <= 0:
            return True
        with self.lock:
            if need > len(self._free):
                return False
            table.blocks.extend(self.allocate(need))
        return True

    def release(self, table: BlockTable) -> None:
        with self.lock:
            self._free.extend(table.blocks)
            table.blocks = []

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

    def write(self, table: BlockTable, data: torch.Tensor) -> None:
        num_tokens = data.shape[2]
        idx = self.slots(table, 0, num_tokens)
        data = data.to(device=self.device, dtype=self.dtype)
        self.k[:, idx] = data[:, 0]
        self.v[:, idx] = data[:, 1]
