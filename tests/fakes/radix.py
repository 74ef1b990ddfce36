"""The fakes' prefix cache: what SGLang's radix cache reports as `meta_info.cached_tokens`."""

from __future__ import annotations

from typing import Any


class RadixCache:
    """Page size 1 (SGLang's default): a prompt's hit is the longest prefix an earlier prompt on this
    server shared, fixed at the request's first chunk (the last token is always computed). A token
    trie, O(prompt) per request; past `max_nodes` tokens it starts empty again (a crude eviction
    that keeps the fake's memory bounded)."""

    def __init__(self, max_nodes: int = 1 << 20) -> None:
        self.max_nodes = max_nodes
        self._root: dict[int, Any] = {}
        self._nodes = 0
        self._hits: dict[str, int] = {}

    def hit(self, rid: str, prompt: list[int]) -> int:
        if rid not in self._hits:
            if self._nodes + len(prompt) > self.max_nodes:
                self._root, self._nodes = {}, 0
            node, matched, i = self._root, 0, 0
            while i < len(prompt) and prompt[i] in node:  # the cached prefix
                node = node[prompt[i]]
                matched += 1
                i += 1
            for tok in prompt[i:]:  # the rest is cached from now on
                node[tok] = node = {}
            self._nodes += len(prompt) - i
            self._hits[rid] = min(matched, max(len(prompt) - 1, 0))
            if len(self._hits) > 4096:
                self._hits.pop(next(iter(self._hits)))
        return self._hits[rid]
