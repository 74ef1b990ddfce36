"""Plain data the scheduling policies decide over. No I/O here: the live control plane and the
simulator build these views from load reports and call the same policy objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["prefill", "decode", "colocated"]


@dataclass(frozen=True)
class InstanceView:
    id: str
    role: Role
    total_kv_tokens: int
    free_kv_tokens: int
    healthy: bool = True
    accepting: bool = True
    queued_prompt_tokens: int = 0
    running_prompt_tokens: int = 0
    running: int = 0
    queued: int = 0
    heavy_decodes: int = 0
    light_decodes: int = 0
    # Predicted remaining output tokens (lower end of bucket) of each running decode.
    decode_remaining: tuple[int, ...] = ()
    # KV tokens promised to requests routed here but not yet visible in the load report.
    reserved_kv_tokens: int = 0
    # For the request being placed: its prompt tokens this instance holds cached (prefix-aware
    # placement fills it in; 0 otherwise).
    cached_prompt_tokens: int = 0
    # Prompt tokens the engine prefills per pass (its chunk; 0: unknown). Running decodes take one
    # token of it each, in engines that batch prefill chunks with decodes.
    chunk_tokens: int = 0

    @property
    def prefill_load(self) -> int:
        return self.queued_prompt_tokens + self.running_prompt_tokens

    @property
    def usable(self) -> bool:
        return self.healthy and self.accepting


@dataclass(frozen=True)
class RequestView:
    id: str
    arrival: float
    prompt_tokens: int
    max_tokens: int
    predicted_bucket: int | None = None
    granularity: int = 200
    heavy_decode_threshold: int = 128
    # The prompt's prefix block hashes (backends/prefix.py), when a prefix-aware policy needs them.
    prefix_hashes: tuple[int, ...] = ()

    @property
    def predicted_output_lo(self) -> int:
        """Lower end of the predicted bucket (the paper sizes resources by it); 0 if unknown."""
        if self.predicted_bucket is None:
            return 0
        return min(self.predicted_bucket * self.granularity, self.max_tokens)

    @property
    def heavy_decode(self) -> bool:
        """Heavy when even the lower end of the predicted bucket exceeds the threshold."""
        return self.predicted_output_lo > self.heavy_decode_threshold

    @property
    def kv_need(self) -> int:
        """KV tokens this request needs by the estimate the dispatcher and admission share."""
        return self.prompt_tokens + self.predicted_output_lo


@dataclass(frozen=True)
class FlipDecision:
    instance_id: str
    to_role: Role
    reason: str = ""


@dataclass
class ClusterView:
    instances: list[InstanceView] = field(default_factory=list)

    def by_role(self, role: Role) -> list[InstanceView]:
        return [i for i in self.instances if i.role == role and i.usable]
