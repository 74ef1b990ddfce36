"""Prefix block hashes: the one definition both sides of the wire use, so that what an engine
reports as cached and what the orchestrator looks up are the same keys (vLLM's design: each full
block's hash chains its parent's, so equal hashes mean equal prefixes; the model name seeds the
chain, so blocks are never shared across models)."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BLOCK_TOKENS = 16  # the built-in engine's KV block size


def _seed(namespace: str) -> int:
    return int.from_bytes(hashlib.blake2b(namespace.encode(), digest_size=8).digest(), "little")


def block_hashes(
    token_ids: Sequence[int], namespace: str, block_tokens: int = BLOCK_TOKENS, parent: int | None = None
) -> list[int]:
    """One 63-bit hash per FULL block of `token_ids` (a trailing partial block has none), each
    covering the whole prefix up to its end. `namespace`: the model (and any cache salt). `parent`:
    the hash of the block before `token_ids[0]`, to extend a chain (an engine hashing blocks as they fill)."""
    out: list[int] = []
    parent = _seed(namespace) if parent is None else parent
    data = array("i", token_ids[: len(token_ids) // block_tokens * block_tokens]).tobytes()
    step = 4 * block_tokens
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    for start in range(0, len(data), step):
        digest = blake2b(data[start : start + step], digest_size=8, key=parent.to_bytes(8, "little")).digest()
        parent = from_bytes(digest, "little") >> 1  # fits a signed 64-bit column / JSON integer
        out.append(parent)
    return out


def reusable_tokens(prompt_tokens: int, matched_blocks: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """Prompt tokens a prefill can skip given `matched_blocks` leading cached blocks: at most all but
    the last prompt token, whose logits must be computed (vLLM's and SGLang's cap)."""
    return min(matched_blocks * block_tokens, max(0, (prompt_tokens - 1) // block_tokens * block_tokens))
