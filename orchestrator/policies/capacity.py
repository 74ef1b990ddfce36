"""The one capacity test shared by the dispatcher's α set and decode admission.

Both sides call :func:`fits`, so a decode instance the dispatcher considers to have room is never
turned away by ``reserve_static``/``reserve_dynamic`` admission for lack of room *now*, and vice
versa (``reserve_dynamic`` adds a look-ahead on top, never a different "now" test).
"""

from __future__ import annotations

from orchestrator.policies.types import InstanceView, RequestView


def available_kv(inst: InstanceView) -> int:
    """KV tokens still promisable on ``inst``: free now, minus what was already promised to requests
    routed there whose KV is not yet visible in the load report (never below zero)."""
    return max(0, inst.free_kv_tokens - inst.reserved_kv_tokens)


def fits(inst: InstanceView, req: RequestView) -> bool:
    """True iff ``inst`` has room for the request's estimated working set now:
    ``free_kv_tokens - reserved_kv_tokens >= prompt_tokens + predicted_output_lo`` (``req.kv_need``)."""
    return inst.free_kv_tokens - inst.reserved_kv_tokens >= req.kv_need


def kv_utilisation(inst: InstanceView) -> float:
    """Fraction of ``inst``'s KV pool in use or promised (0.0 when the pool size is unknown)."""
    if inst.total_kv_tokens <= 0:
        return 0.0
    used = inst.total_kv_tokens - available_kv(inst)
    return min(1.0, max(0.0, used / inst.total_kv_tokens))
