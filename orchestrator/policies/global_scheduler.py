"""Level-1 cluster scheduling: pick the prefill (or co-located) instance for a new request.

TetriInfer §3.2: "forward each new request to the prefill instance with the least load". The paper
does not define load or a tie-break; ours: load = queued + running prompt tokens
(``InstanceView.prefill_load``), ties broken by fewest running requests, then by instance id, so the
choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from orchestrator.policies.types import InstanceView, RequestView

GLOBAL_SCHEDULER_NAMES: tuple[str, ...] = ("least_loaded",)


class GlobalScheduler(Protocol):
    name: str

    def pick(self, instances: Sequence[InstanceView], req: RequestView) -> str | None: ...


def prefill_candidates(instances: Sequence[InstanceView]) -> list[InstanceView]:
    """Usable instances that can prefill: the ``prefill`` ones, or, if the caller passed none, the
    ``colocated`` ones. Decode instances are never candidates."""
    usable = [i for i in instances if i.usable]
    prefill = [i for i in usable if i.role == "prefill"]
    if prefill:
        return prefill
    return [i for i in usable if i.role == "colocated"]


class LeastLoadedPrefill:
    """Least ``prefill_load`` (queued + running prompt tokens); tie: fewest running, then id."""

    name = "least_loaded"

    def pick(self, instances: Sequence[InstanceView], req: RequestView) -> str | None:
        candidates = prefill_candidates(instances)
        if not candidates:
            return None
        best = min(candidates, key=lambda i: (i.prefill_load, i.running, i.id))
        return best.id


def make_global_scheduler(name: str = "least_loaded") -> GlobalScheduler:
    if name == "least_loaded":
        return LeastLoadedPrefill()
    raise ValueError(f"unknown global scheduler {name!r}; choose one of {', '.join(GLOBAL_SCHEDULER_NAMES)}")
