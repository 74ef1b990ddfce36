"""Level-1 cluster scheduling: pick the prefill (or co-located) instance for a new request.

TetriInfer §3.2: "forward each new request to the prefill instance with the least load". The paper
does not define load or a tie-break; ours: load = queued + running prompt tokens
(``InstanceView.prefill_load``), ties broken by fewest running requests, then by instance id, so the
choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from orchestrator.policies.registry import build, names, register
from orchestrator.policies.types import InstanceView, RequestView


class GlobalScheduler(Protocol):
    name: str
    uses_prefix: bool  # whether it reads the views' cached_prompt_tokens

    def pick(self, instances: Sequence[InstanceView], req: RequestView) -> str | None: ...


def prefill_candidates(instances: Sequence[InstanceView]) -> list[InstanceView]:
    """Usable instances that can prefill: the ``prefill`` ones, or, if the caller passed none, the
    ``colocated`` ones. Decode instances are never candidates."""
    usable = [i for i in instances if i.usable]
    prefill = [i for i in usable if i.role == "prefill"]
    if prefill:
        return prefill
    return [i for i in usable if i.role == "colocated"]


@register("global_scheduler", "least_loaded")
class LeastLoadedPrefill:
    """Least ``prefill_load`` (queued + running prompt tokens); tie: fewest running, then id."""

    name = "least_loaded"
    uses_prefix = False

    def pick(self, instances: Sequence[InstanceView], req: RequestView) -> str | None:
        candidates = prefill_candidates(instances)
        if not candidates:
            return None
        best = min(candidates, key=lambda i: (i.prefill_load, i.running, i.id))
        return best.id


def prefill_wait(inst: InstanceView, own_tokens: float) -> float:
    """How long a prompt waits for its prefill there, in passes' worth of tokens: the prompt work
    ahead of it plus its own uncached tokens, over what a pass prefills (the chunk less one token per
    running decode, where decodes share the pass: co-located and decode instances); the token count
    itself where the chunk is unknown."""
    work = inst.prefill_load + own_tokens
    if inst.chunk_tokens <= 0:
        return work
    per_pass = float(inst.chunk_tokens)
    if inst.role != "prefill":
        per_pass = max(per_pass - inst.running, per_pass / 8)
    return work / per_pass * inst.chunk_tokens


@register("global_scheduler", "prefix_aware")
class PrefixAwarePrefill:
    """Least uncached prefill work: the instance's prefill load plus this prompt's tokens it does not
    hold cached (``cached_prompt_tokens``, weighted), plus ``running_weight`` tokens per request
    running there (the decode working set the request joins); tie: fewest running, then id. The
    paper's load model with prefix caching: a hit is worth little where the queue is long."""

    name = "prefix_aware"
    uses_prefix = True

    def __init__(self, cache_weight: float = 4.0, running_weight: float = 16.0) -> None:
        self.cache_weight = cache_weight
        self.running_weight = running_weight

    def cost(self, inst: InstanceView, req: RequestView) -> float:
        uncached = req.prompt_tokens - self.cache_weight * inst.cached_prompt_tokens
        return prefill_wait(inst, uncached) + self.running_weight * inst.running

    def pick(self, instances: Sequence[InstanceView], req: RequestView) -> str | None:
        candidates = prefill_candidates(instances)
        if not candidates:
            return None
        return min(candidates, key=lambda i: (self.cost(i, req), i.running, i.id)).id


@register("global_scheduler", "sglang_cache_aware")
class SGLangCacheAware:
    """The SGLang router's `cache_aware` rule (sglang-router 0.3.2): load = requests in flight; if
    the load is imbalanced (max - min > balance_abs and max > min * balance_rel) the least loaded,
    else if the best cache match covers more than `cache_threshold` of the prompt that instance,
    else the least loaded. Its tree is approximate (what was routed where); ours counts blocks of
    tokens where it counts characters."""

    name = "sglang_cache_aware"
    uses_prefix = True

    def __init__(self, cache_threshold: float = 0.3, balance_abs: int = 64, balance_rel: float = 1.5) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel

    def pick(self, instances: Sequence[InstanceView], req: RequestView) -> str | None:
        candidates = prefill_candidates(instances)
        if not candidates:
            return None
        least = min(candidates, key=lambda i: (i.running + i.queued, i.id))
        lo, hi = least.running + least.queued, max(i.running + i.queued for i in candidates)
        if hi - lo > self.balance_abs and hi > lo * self.balance_rel:
            return least.id
        best = max(candidates, key=lambda i: (i.cached_prompt_tokens, -(i.running + i.queued), i.id))
        if req.prompt_tokens > 0 and best.cached_prompt_tokens / req.prompt_tokens > self.cache_threshold:
            return best.id
        return least.id


def make_global_scheduler(
    name: str = "least_loaded",
    cache_weight: float = 4.0,
    running_weight: float = 16.0,
    cache_threshold: float = 0.3,
    balance_abs: int = 64,
    balance_rel: float = 1.5,
) -> GlobalScheduler:
    return build("global_scheduler", name, cache_weight=cache_weight, running_weight=running_weight,
                 cache_threshold=cache_threshold,
                 balance_abs=balance_abs, balance_rel=balance_rel)  # fmt: skip


GLOBAL_SCHEDULER_NAMES: tuple[str, ...] = names("global_scheduler")
