"""Prefix caching in the simulator: each instance's cache of KV blocks, in LRU order.

A request carries `blocks`: ids of the full 16-token blocks of its conversation (prompt, then
answer), equal ids meaning equal prefixes (a session's turns share their history; a group's prompts
share a system prompt). An instance caches the prompt blocks it prefills or receives, and the
answer blocks it decodes; a prompt reuses the longest run of leading blocks its instance holds, up
to all but its last token (backends/prefix.py's cap). Eviction is LRU at the instance's KV size in
blocks: cached blocks live in free KV, as in vLLM, and running requests' KV is not subtracted (an
optimistic cache: noted where results are reported)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from backends.prefix import BLOCK_TOKENS, reusable_tokens


class SimPrefixCache:
    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = max(1, capacity_blocks)
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.hit_tokens = 0
        self.query_tokens = 0

    def match(self, blocks: Sequence[int]) -> int:
        """Leading blocks held (without touching recency)."""
        n = 0
        for b in blocks:
            if b not in self.blocks:
                break
            n += 1
        return n

    def reuse(self, blocks: Sequence[int], prompt_tokens: int) -> int:
        """A prompt enters the engine: the tokens it reuses (recency refreshed, counters kept)."""
        prompt_blocks = blocks[: prompt_tokens // BLOCK_TOKENS]
        n = self.match(prompt_blocks)
        for b in prompt_blocks[:n]:
            self.blocks.move_to_end(b)
        hit = reusable_tokens(prompt_tokens, n)
        self.hit_tokens += hit
        self.query_tokens += prompt_tokens
        return hit

    def insert(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            self.blocks[b] = None
            self.blocks.move_to_end(b)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
