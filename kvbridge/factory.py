"""The hand-off strategy of each backend, looked up by the backend's name (SGLang's `get_kv_class`,
vLLM's KV-connector factory): one strategy per backend. Here, not in kvbridge/base.py, because the
strategies import base.py."""

from __future__ import annotations

import functools

from kvbridge.base import HandoffStrategy
from kvbridge.native import NativePushStrategy
from kvbridge.sglang import BootstrapRoomStrategy
from kvbridge.tensorrt_llm import DisaggregatedParamsStrategy

STRATEGIES: dict[str, type[HandoffStrategy]] = {
    "native": NativePushStrategy,
    "sim": NativePushStrategy,  # simulated workers speak the native workers' API
    "sglang": BootstrapRoomStrategy,
    "tensorrt-llm": DisaggregatedParamsStrategy,
}


def strategy_class(backend_kind: str) -> type[HandoffStrategy]:
    try:
        return STRATEGIES[backend_kind]
    except KeyError:
        raise ValueError(f"no KV handoff strategy for backend {backend_kind!r}") from None


@functools.cache
def strategy_for(backend_kind: str, lease_s: float = 30.0, early_first_token: bool = True) -> HandoffStrategy:
    """The handoff strategy for a prefill/decode pair of one backend kind (one object per kind and
    settings: strategies keep no per-request state). `early_first_token` (native, TensorRT-LLM):
    relay the first token before the KV hand-off is done; safe only where the control plane can
    resume a request whose hand-off then fails (request migration)."""
    return strategy_class(backend_kind)(lease_s, early_first_token)
