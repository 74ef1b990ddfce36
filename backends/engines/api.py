"""The contract between a stepped engine core (native PyTorch or sim) and the worker process.

The worker runs the core in one thread (`backends.engines.runner.EngineRunner`) and exposes it over HTTP
(`backends.engines.server`). Cores are synchronous and single-threaded: every call below is made
from the runner's thread only, except `import_kv` (see there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from backends.base import KVEvents, LoadReport, Role, SamplingParams

Mode = Literal["full", "prefill_only", "decode_only"]


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    # full: prefill + decode here. prefill_only: prefill, sample the first token, keep the KV
    # blocks until exported/released. decode_only: the KV of prompt_ids was imported under
    # request_id (import_kv) and `first_token` was sampled by the prefill side.
    mode: Mode = "full"
    first_token: int | None = None
    predicted_output_lo: int | None = None
    heavy_decode: bool | None = None


@dataclass
class StepOutput:
    request_id: str
    token_id: int | None  # None when the request ends without a new token (abort, error)
    text: str  # detokenized delta, with stop strings already cut
    # "stop" | "length" | "abort" | "error" | "prefilled" (prefill_only: KV ready to export)
    finish_reason: str | None = None
    error: str | None = None
    # "prefilled" outputs from an EngineRunner carry the KV, exported on the engine thread right after
    # the step (the blocks are released then), so a hand-off never waits behind the next forward pass.
    kv: KVPayload | None = None
    # On the output of a request's first token: the prompt tokens it found in the prefix cache.
    cached_tokens: int | None = None


@dataclass
class KVPayload:
    """One request's KV cache: `data` is a torch tensor [layers, 2, tokens, kv_heads, head_dim]."""

    request_id: str
    num_tokens: int
    data: Any
    model: str
    extra: dict[str, Any] = field(default_factory=dict)


class KVPrefixGone(ValueError):
    """import_kv of a push that skipped positions the receiver's prefix cache held when the push was
    announced, evicted since: the sender must push the whole KV again."""


class Scheduled(Protocol):
    """What PassShape reads of a scheduled sequence (backends/engines/native/sequence.py's Sequence)."""

    num_computed: int  # leading tokens whose K/V is in the pool
    outputs: list[int]


@dataclass(frozen=True)
class PassShape:
    """The aggregates of one forward pass that a timing model prices (backends/engines/simulated/timing.py)."""

    tokens: int = 0  # prefill tokens, Σc
    units: float = 0.0  # causal attention work, Σ(c² + 2ck) over chunks c with k cached tokens
    seqs: int = 0  # prefill chunks
    dseqs: int = 0  # decoding sequences
    ctx: int = 0  # Σ context of the decoding sequences

    @classmethod
    def of(cls, plan: list[tuple[Scheduled, int]]) -> PassShape:
        """Call before the plan runs (it reads each sequence's cached length)."""
        tokens = seqs = dseqs = ctx = 0
        units = 0.0
        for seq, n in plan:
            start = seq.num_computed
            if n == 1 and seq.outputs:
                dseqs += 1
                ctx += start + 1
            else:
                tokens += n
                seqs += 1
                units += n * n + 2.0 * n * start
        return cls(tokens, units, seqs, dseqs, ctx)

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


class EngineCore(Protocol):
    role: Role
    model_name: str
    chunk_size: int
    last_pass: PassShape | None  # the latest step's pass (None: it ran none); the runner logs it

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. Raises ValueError on a request the engine can never serve."""

    def step(self) -> list[StepOutput]:
        """Run one iteration (one forward pass); return what each request produced."""

    def has_work(self) -> bool: ...

    def abort(self, request_id: str) -> None:
        """Drop a request anywhere in its life and free its KV; emits no further output."""

    def export_kv(self, request_id: str) -> KVPayload: ...

    def import_kv(self, payload: KVPayload) -> None:
        """Allocate blocks for `payload` and copy it in. Raises MemoryError when the pool is full.
        Unlike every other method, safe to call from another thread while `step()` runs (the copy
        overlaps the forward pass instead of waiting for it: the pool's allocator is locked)."""

    def release_kv(self, request_id: str) -> None:
        """Free KV held for a request that is not running (exported, or imported but unclaimed)."""

    def set_role(self, role: Role) -> None:
        """Change role; only called when the engine has no work."""

    def load(self) -> LoadReport: ...

    def kv_events(self, since: int) -> KVEvents | None:
        """Prefix-cache block events after event number `since`, or a reset (KVEvents.reset) with the
        whole cached set; None when the engine keeps no prefix cache. Safe from any thread."""

    def detokenize(self, token_ids: list[int]) -> str: ...

    def info(self) -> dict[str, Any]:
        """Static facts: model, block_size, total KV tokens, dtype, layers, kv heads, head dim."""
