"""A request's life inside the engine: its tokens, how many have K/V in the pool, its blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from backends.engines.api import EngineRequest
from backends.engines.native.detokenize import IncrementalDetokenizer
from backends.engines.native.kv_cache import BlockTable


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
