"""How a prefilled request's KV cache reaches its decode instance: one strategy per backend.

A strategy runs the whole disaggregated request (prefill, handoff, decode) and yields tokens as
they come, so the first token reaches the client as soon as the prefill side has it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from backends.base import Backend, GenRequest, TokenEvent


@dataclass
class HandoffStats:
    kv_tokens: int = 0
    kv_bytes: int = 0
    transfer_s: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def bytes_per_s(self) -> float:
        return self.kv_bytes / self.transfer_s if self.transfer_s > 0 else 0.0


class HandoffStrategy(ABC):
    name: str = "abstract"

    def __init__(self, lease_s: float = 30.0) -> None:
        self.lease_s = lease_s

    @abstractmethod
    def run(
        self, request: GenRequest, prefill: Backend, decode: Backend, stats: HandoffStats
    ) -> AsyncIterator[TokenEvent]:
        """Yield the request's tokens: events with phase="prefill" first, then phase="decode".

        Fills `stats` as the handoff happens. Closing the iterator early (client gone) must abort
        the request on both sides so their KV is freed.
        """


def strategy_for(backend_kind: str, lease_s: float = 30.0, early_first_token: bool = True) -> HandoffStrategy:
    """The handoff strategy for a prefill/decode pair of one backend kind. `early_first_token`
    (native): relay the first token before the KV push is done; safe only where the control plane
    can resume a request whose push then fails (request migration)."""
    if backend_kind in ("native", "sim"):
        from kvbridge.native import NativePushStrategy

        return NativePushStrategy(lease_s, early_first_token)
    if backend_kind == "sglang":
        from kvbridge.sglang import BootstrapRoomStrategy

        return BootstrapRoomStrategy(lease_s)
    if backend_kind == "tensorrt-llm":
        from kvbridge.tensorrt_llm import DisaggregatedParamsStrategy

        return DisaggregatedParamsStrategy(lease_s, early_first_token)
    raise ValueError(f"no KV handoff strategy for backend {backend_kind!r}")
