"""Where a co-located request runs when it runs on a decode instance (conditional disaggregation):
the room test, and the host pickers registered by name (`colocate_pick`). Views come from the
driver with its own queue already folded in (queued prompts and tokens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from orchestrator.policies.capacity import available_kv
from orchestrator.policies.types import InstanceView, RequestView

# Free KV after reservations a decode instance keeps beyond the request before it takes a prompt of
# its own: its decodes still grow (the simulator's 80% rule).
ROOM_HEADROOM = 0.2


def has_room(view: InstanceView, req: RequestView, headroom: float = ROOM_HEADROOM) -> bool:
    """Nothing waits there and its free KV after reservations covers `headroom` of the pool plus the
    request's estimated working set (`kv_need`: the prompt when no length is predicted)."""
    if view.queued > 0 or view.total_kv_tokens <= 0:
        return False
    return available_kv(view) - req.kv_need >= headroom * view.total_kv_tokens


def _prefill_load_key(v: InstanceView) -> tuple[int, int, int, str]:
    return v.prefill_load - v.cached_prompt_tokens, v.running + v.queued, -available_kv(v), v.id


def _outstanding_key(v: InstanceView) -> tuple[int, int, int, str]:
    return v.running + v.queued, 0, 0, v.id


HOST_PICKERS: dict[str, Callable[[InstanceView], tuple[int, int, int, str]]] = {
    # Least prompt tokens waiting or prefilling (what a new prompt waits behind: the global
    # scheduler's rule; less what the request finds cached there, when that is known), then
    # fewest outstanding requests, then most available KV, then id.
    "prefill_load": _prefill_load_key,
    # Fewest outstanding requests, then id: a plain load balancer, as in front of vLLM.
    "outstanding": _outstanding_key,
}
HOST_PICKER_NAMES: tuple[str, ...] = tuple(HOST_PICKERS)


def pick_host(hosts: Sequence[InstanceView], rule: str = "prefill_load") -> str | None:
    best = min(hosts, key=HOST_PICKERS[rule], default=None)
    return best.id if best is not None else None
