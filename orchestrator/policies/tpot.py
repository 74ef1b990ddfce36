"""TPOT-aware placement (issue 21): where goodput is TPOT-bound, keep prefill interference off the
requests whose TPOT it hurts most.

A prefill chunk riding in a decode step stretches that step for every decode there; a decode's TPOT
averages its steps over its own output, so the same stretch costs a short (light) decode far more
per token than a long (heavy) one. Two co-located host pickers (``colocate_pick``), over the same
views as hosts.py:

* ``light_first``: the host with the fewest light decodes and queued prompts (the decodes a new
  prompt's chunks would hurt most, and those about to become decodes), then least prefill work, then
  fewest running, then id.
* ``tpot_harm``: the least (prefill work waiting there + one chunk) x (light decodes + queued + 1):
  how many fragile decodes the prompt's chunks, and those ahead of it, would ride beside.

The batch cap derived from the TPOT SLO is decode admission's ``decode_max_running``
(admission.py): :func:`batch_cap` sizes it from a step-time model.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.policies.capacity import available_kv
from orchestrator.policies.hosts import HOST_PICKERS
from orchestrator.policies.types import InstanceView

# The chunk a prompt is charged when the engine does not report one (the simulator's H100 knee).
DEFAULT_CHUNK = 1024


def _light_first_key(v: InstanceView) -> tuple[int, int, int, str]:
    return v.light_decodes + v.queued, v.prefill_load - v.cached_prompt_tokens, v.running, v.id


def _tpot_harm_key(v: InstanceView) -> tuple[int, int, int, str]:
    work = max(0, v.prefill_load - v.cached_prompt_tokens) + (v.chunk_tokens or DEFAULT_CHUNK)
    return work * (v.light_decodes + v.queued + 1), v.running + v.queued, -available_kv(v), v.id


TPOT_PICKERS: dict[str, Callable[[InstanceView], tuple[int, int, int, str]]] = {
    "light_first": _light_first_key,
    "tpot_harm": _tpot_harm_key,
}
# The host rule looks pickers up in hosts.HOST_PICKERS; policies/config.py registers them by name.
HOST_PICKERS.update(TPOT_PICKERS)


def batch_cap(step_s: Callable[[int], float], tpot_slo_s: float, limit: int = 1024) -> int:
    """The largest decode batch whose step (``step_s(batch)``, seconds) is within ``tpot_slo_s``;
    at least 1, at most ``limit``. ``step_s`` must not decrease with the batch."""
    lo, hi = 1, limit
    if step_s(hi) <= tpot_slo_s:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if step_s(mid) <= tpot_slo_s:
            lo = mid
        else:
            hi = mid - 1
    return lo
