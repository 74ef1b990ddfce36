"""The one interface the control plane uses to drive any execution backend.

Adapters translate between this interface and an engine's wire protocol; they never schedule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Role = Literal["prefill", "decode", "colocated"]
FinishReason = Literal["stop", "length", "abort", "error"]


# SamplingParams fields that stay None unless the client gave them: the engine's default applies.
ENGINE_DEFAULT_FIELDS = ("temperature", "top_p")


@dataclass
class SamplingParams:
    # None: the client did not give it, so the engine applies its own default (newer engines read
    # the model's generation_config.json; tetri's own engine uses 1.0). Adapters leave it out of requests.
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Benchmarks force exact output lengths (vLLM/SGLang's ignore_eos extension).
    ignore_eos: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The fields as a wire body; those left to the engine's default are left out, so the
        receiver applies its own default."""
        out = asdict(self)
        for name in ENGINE_DEFAULT_FIELDS:
            if out[name] is None:
                del out[name]
        return out


@dataclass
class GenRequest:
    """A tokenized request as the control plane hands it to a backend."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    prompt_text: str | None = None
    # Predicted output-length bucket's lower end (tokens); None when no predictor ran yet.
    predicted_output_lo: int | None = None
    heavy_decode: bool | None = None


@dataclass
class TokenEvent:
    """New output of one request: token ids, their text and, on the last event, the finish reason."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    # Which side produced it: lets the control plane mark first-token and decode-start times.
    phase: Literal["prefill", "decode", "generate"] = "generate"
    error: str | None = None
    # On an "error" event: another instance could get past this failure (a broken stream, an
    # engine's 503 retraction), so the control plane may continue the request there (migration).
    retryable: bool = False
    # On one event of engines with a prefix cache: the prompt tokens it did not have to prefill.
    cached_tokens: int | None = None


@dataclass
class LoadReport:
    role: Role
    running: int = 0
    queued: int = 0
    free_kv_tokens: int = 0
    total_kv_tokens: int = 0
    queued_prompt_tokens: int = 0
    running_prompt_tokens: int = 0
    heavy_decodes: int = 0
    light_decodes: int = 0
    # Predicted remaining output tokens (lower end) of each running decode: reserve-dynamic input.
    decode_remaining: list[int] = field(default_factory=list)
    leased_kv_tokens: int = 0
    active_leases: int = 0
    chunk_size: int = 0
    backend: str = "native"
    model: str = ""
    accepting: bool = True
    # Prefix cache (engines that have one): blocks held cached, and prompt tokens looked up and found
    # since the engine started (counters: a hit rate is their ratio).
    cached_blocks: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    # The engine's block events since this adapter's last poll (backends/prefix.py keys); None: the
    # engine does not report them.
    kv_events: KVEvents | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadReport:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        events = known.get("kv_events")
        if isinstance(events, dict):
            known["kv_events"] = KVEvents.from_dict(events)
        return cls(**known)


@dataclass
class KVEvents:
    """Blocks an engine stored in and removed from its prefix cache since a given event sequence
    number; `reset`: `stored` is its whole cache (the asker was too far behind, or new)."""

    seq: int = 0  # the last event included: ask for what follows next time
    reset: bool = False
    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVEvents:
        return cls(
            seq=int(data.get("seq", 0)), reset=bool(data.get("reset", False)),
            stored=[int(h) for h in data.get("stored", [])], removed=[int(h) for h in data.get("removed", [])],
        )


@dataclass
class KVHandle:
    """Where a prefilled request's KV cache now waits for its decode instance to claim it."""

    request_id: str
    num_tokens: int
    first_token_id: int
    lease_id: str = ""
    lease_deadline: float = 0.0
    nbytes: int = 0
    transfer_s: float = 0.0
    # Backend-specific handoff facts (SGLang bootstrap room, TRT-LLM disaggregated_params).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Handoff:
    """The decode target chosen for a prefill: the prefill side pushes KV straight to it."""

    decode_url: str
    decode_instance_id: str
    lease_s: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class HandoffStats:
    """What one hand-off did (filled by its strategy and the adapters it drives, kvbridge/)."""

    kv_tokens: int = 0
    kv_bytes: int = 0
    transfer_s: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def bytes_per_s(self) -> float:
        return self.kv_bytes / self.transfer_s if self.transfer_s > 0 else 0.0


@dataclass
class PrefillResult:
    """A worker's non-streamed /prefill answer (backends/worker/client.py)."""

    first: TokenEvent
    kv: KVHandle | None  # None when the prefill already finished the request (e.g. max_tokens=1, EOS)


class BackendError(Exception):
    """An engine refused or failed a call. `status` mirrors HTTP semantics for the API layer."""

    def __init__(self, message: str, status: int = 502, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class BackendBusy(BackendError):
    """Every connection to the instance is in use: a sign of load, never of ill health. The
    request is retried or answered 503 with Retry-After; the instance stays in service."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503, retryable=True)


class Backend(ABC):
    """One engine instance. Implementations: native, sim (same HTTP API), sglang, tensorrt-llm."""

    kind: str = "abstract"
    # Whether a decode-role instance serves `generate` (prefill + decode, no KV transfer): the
    # orchestrator's co-located fallback onto decode instances. SGLang/TensorRT-LLM decode servers
    # in disaggregation mode only take requests whose KV arrives from a prefill server.
    generates_on_decode: bool = False

    def __init__(self, url: str, instance_id: str, role: Role, model: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.instance_id = instance_id
        self.role: Role = role
        self.model = model

    @abstractmethod
    async def health(self) -> bool: ...

    @abstractmethod
    async def load(self) -> LoadReport: ...

    async def info(self) -> dict[str, Any]:
        """Static facts read once at registration (capacity, page size, model)."""
        return {}

    # A disaggregated request is not a method here: each backend moves KV its own way, so its
    # hand-off strategy (kvbridge/, one per backend) drives the adapter's own public calls for it.

    @abstractmethod
    def generate(self, request: GenRequest) -> AsyncIterator[TokenEvent]: ...

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    async def set_role(self, role: Role) -> dict[str, Any]:
        raise BackendError(f"{self.kind} backend cannot change role in place", status=409)

    async def drain(self, accepting: bool = False) -> dict[str, Any]:
        raise BackendError(f"{self.kind} backend cannot drain", status=409)

    async def close(self) -> None:
        return None
