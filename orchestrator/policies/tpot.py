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
* ``least_context``: the least KV context there once its waiting prompts are in (KV in use or
  reserved, plus the prompt work waiting, less what the request finds cached): a decode step's time
  grows with the batch's context far more than with its size (on the H100 / Llama-2-7B profile a
  batch of 20 steps in 8.8 ms at 500 tokens of context each, 12.1 ms at 1,500), so this is the host
  whose steps, the new request's included, are predicted shortest. Then fewest outstanding, then id.

**Isolation** (``tpot_isolate_weight`` > 0, :func:`pick_isolated`): a decode step's time grows with
the context of every decode in it, and a few requests hold most of it (on Mixed the 7% with the
largest output x context hold 43% of the decode context-seconds). Requests whose predicted weight
(predicted output x (prompt + half of it): KV tokens held, summed over their steps) is at least the
threshold run co-located on a fixed share of the hosts (``tpot_isolate_share``, the first by id),
the rest on the others; each group by the ``colocate_pick`` rule. The heavy group's steps are long,
so its requests' TPOT suffers; the many others' steps are short. Under a goodput SLO (90% of
requests) that spends the tail on the few requests that make the steps long.

The batch cap derived from the TPOT SLO is decode admission's ``decode_max_running``
(admission.py): :func:`batch_cap` sizes it from a step-time model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orchestrator.policies.capacity import available_kv
from orchestrator.policies.hosts import HOST_PICKERS, pick_host
from orchestrator.policies.types import InstanceView, RequestView

# The chunk a prompt is charged when the engine does not report one (the simulator's H100 knee).
DEFAULT_CHUNK = 1024


def _light_first_key(v: InstanceView) -> tuple[int, int, int, str]:
    return v.light_decodes + v.queued, v.prefill_load - v.cached_prompt_tokens, v.running, v.id


def _tpot_harm_key(v: InstanceView) -> tuple[int, int, int, str]:
    work = max(0, v.prefill_load - v.cached_prompt_tokens) + (v.chunk_tokens or DEFAULT_CHUNK)
    return work * (v.light_decodes + v.queued + 1), v.running + v.queued, -available_kv(v), v.id


def _least_context_key(v: InstanceView) -> tuple[int, int, int, str]:
    context = v.total_kv_tokens - available_kv(v) + v.prefill_load - v.cached_prompt_tokens
    return context, v.running + v.queued, 0, v.id


TPOT_PICKERS: dict[str, Callable[[InstanceView], tuple[int, int, int, str]]] = {
    "light_first": _light_first_key,
    "tpot_harm": _tpot_harm_key,
    "least_context": _least_context_key,
}
# The host rule looks pickers up in hosts.HOST_PICKERS; policies/config.py registers them by name.
HOST_PICKERS.update(TPOT_PICKERS)


def predicted_weight(req: RequestView) -> int:
    """KV tokens the request holds, summed over its decode steps, by its predicted output (the middle
    of its bucket; 0 when nothing is predicted): output x (prompt + output / 2)."""
    if req.predicted_bucket is None:
        return 0
    out = min(req.max_tokens, req.predicted_output_lo + req.granularity // 2)
    return out * (req.prompt_tokens + out // 2)


@dataclass(frozen=True)
class Isolation:
    """Heavy requests (predicted weight >= ``weight``) on the first ``share`` of the hosts, by id."""

    weight: int
    share: float = 0.25

    def group(self, req: RequestView, hosts: Sequence[InstanceView]) -> list[InstanceView]:
        """The hosts (of those offered) the request may run on: its group, or all of them when the
        other group is empty (fewer than two hosts, or none of its group offered)."""
        ids = sorted(h.id for h in hosts)
        if len(ids) < 2:
            return list(hosts)
        k = min(len(ids) - 1, max(1, round(self.share * len(ids))))
        heavy_ids = set(ids[:k])
        heavy = predicted_weight(req) >= self.weight
        return [h for h in hosts if (h.id in heavy_ids) == heavy] or list(hosts)


def pick_isolated(
    req: RequestView, hosts: Sequence[InstanceView], rule: str, isolation: Isolation | None
) -> str | None:
    """The host by ``rule`` within the request's isolation group (all hosts when isolation is off)."""
    return pick_host(isolation.group(req, hosts) if isolation is not None else hosts, rule)


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
