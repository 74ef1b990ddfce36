"""The fakes' prefix cache: what SGLang's radix cache reports as `meta_info.cached_tokens`."""

from __future__ import annotations

import collections


class RadixCache:
    """Page size 1 (SGLang's default): a prompt's hit is the longest prefix an earlier prompt on this
    server shared, fixed at the request's first chunk; the last 256 prompts are kept."""

    def __init__(self) -> None:
        self._prompts: collections.deque[tuple[int, ...]] = collections.deque(maxlen=256)
        self._hits: dict[str, int] = {}

    def hit(self, rid: str, prompt: list[int]) -> int:
        if rid not in self._hits:
            best = max((_common(prompt, seen) for seen in self._prompts), default=0)
            self._hits[rid] = min(best, max(len(prompt) - 1, 0))  # the last token is always computed
            self._prompts.append(tuple(prompt))
            if len(self._hits) > 4096:
                self._hits.pop(next(iter(self._hits)))
        return self._hits[rid]


def _common(a: list[int], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
