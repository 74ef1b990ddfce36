"""A request's life inside the engine: its tokens, how many have K/V in the pool, its blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from backends.engines.api import EngineRequest
from backends.engines.native.detokenize import IncrementalDetokenizer
from backends.engines.native.kv_cache import BLOCK_SIZE, BlockTable
from backends.prefix import block_hashes


class Status(Enum):
    WAITING = "waiting"  # needs prefill (new, or preempted for recompute)
    READY = "ready"  # decode_only with imported KV, waiting for a batch slot
    RUNNING = "running"
    HELD = "held"  # prefill_only done: KV kept for export
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    req: EngineRequest
    tokens: list[int]  # prompt followed by the outputs
    prompt_len: int
    detok: IncrementalDetokenizer
    order: int  # admission order key (lower = older)
    outputs: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V is in the pool
    table: BlockTable = field(default_factory=BlockTable)
    status: Status = Status.WAITING
    preemptions: int = 0
    hashes: list[int] = field(default_factory=list)  # prefix hashes of the full blocks of `tokens` so far
    cached_tokens: int | None = None  # prompt tokens its first admission found cached (reported once)

    def block_hashes(self, namespace: str, num_tokens: int) -> list[int]:
        """`hashes`, extended to cover the full blocks of the first `num_tokens` tokens (tokens are
        only ever appended, so hashes once computed stay valid; the list may be longer)."""
        want, have = num_tokens // BLOCK_SIZE, len(self.hashes)
        if want > have:
            parent = self.hashes[-1] if have else None
            self.hashes += block_hashes(self.tokens[have * BLOCK_SIZE : want * BLOCK_SIZE], namespace, parent=parent)
        return self.hashes

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return len(self.tokens) - self.num_computed

    @property
    def in_decode(self) -> bool:
        return bool(self.outputs) and self.remaining <= 1

    @property
    def prefill_left(self) -> int:
        """Tokens of prefill (or recompute) work still ahead of this sequence."""
        return 0 if self.remaining <= 1 else self.remaining
