"""Sizing the prefill and decode pools from recent traffic: the plan (`GET /admin/plan`), its
application (`POST /admin/plan/apply`: flip the least busy instances until the pools match), and,
when `plan_auto_interval_s` is set, the same two steps on a timer (`AutoPlanner`).

The plan simulates the candidate splits on the deployment's timing profile (backends/sim/planner.py);
it is as good as that profile. Applying it drains and flips instances, so the automatic planner
only acts on a split that two plans in a row agree on, and never while a plan or a flip is running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from backends.base import BackendError
from orchestrator.errors import APIError

log = logging.getLogger("tetri.plan")


def recommend_for_traffic(
    app_state: Any, window_s: float, objective: str, profile: str, instances: int | None, ttft_slo_ms: float
) -> dict[str, Any]:
    """The split the finished requests of the last `window_s` call for (what GET /admin/plan
    answers); APIError 409 when there is too little traffic or nothing to divide."""
    from backends.sim.cluster import system_config
    from backends.sim.planner import colocated_by_rule, layout_utilisation, recommend_split
    from backends.sim.profiles import get_timing

    current: dict[str, int] = {}
    for inst in app_state.cluster.instances.values():
        if inst.state != "unhealthy":
            current[inst.role] = current.get(inst.role, 0) + 1
    pool = pd_pool(app_state)
    # P = 0 runs every request co-located on the decode instances: only where their engines can.
    allow_no_prefill = app_state.settings.colocate_on_decode and all(
        i.backend.generates_on_decode for i in pool if i.role == "decode"
    )
    # The prefill and decode pools are what a split divides; with none, every instance.
    n = instances if instances is not None else (len(pool) or sum(current.values()))
    if n < 1:
        raise APIError(409, "no instances to plan for", code="no_instances")
    app_state.store.flush()
    rows = app_state.store.recent_traffic(time.time() - window_s)
    if len(rows) < 2:
        raise APIError(409, f"only {len(rows)} finished requests in the last {window_s:g} s; need at least 2",
                       code="not_enough_traffic")  # fmt: skip
    span = rows[-1]["arrival"] - rows[0]["arrival"]
    rate = (len(rows) - 1) / span if span > 0 else float(len(rows))
    s = app_state.settings
    cfg = system_config(
        "tetri", plan_objective=objective, plan_ttft_slo_ms=ttft_slo_ms,
        heavy_prefill_threshold=s.heavy_prefill_threshold, heavy_decode_threshold=s.heavy_decode_threshold,
    )  # fmt: skip
    prompts, outputs = [r["prompt_tokens"] for r in rows], [r["completion_tokens"] for r in rows]
    timing = get_timing(profile)
    try:
        choice = recommend_split(n, prompts, outputs, rate, timing, cfg, allow_no_prefill=allow_no_prefill)
    except ValueError as exc:
        raise APIError(409, str(exc), code="cannot_plan") from exc
    # Does the layout running now keep up with this traffic? (>= 1: a pool falls behind for good.)
    p_now = sum(1 for i in pool if i.role == "prefill")
    d_now = len(pool) - p_now
    now_util = None
    if d_now >= 1:
        mask = colocated_by_rule(prompts, outputs, cfg)
        now_util = layout_utilisation(p_now, len(pool), prompts, outputs, timing, cfg, rate, mask)
    return {
        "recommended": {"prefill": choice.prefill, "decode": choice.decode},
        "current": current,
        "current_utilisation": now_util,
        "instances": n,
        "traffic": {"requests": len(rows), "window_s": window_s, "rate_rps": rate},
        "profile": profile,
        "objective": objective,
        **({"ttft_slo_ms": ttft_slo_ms} if objective == "slo" else {}),
        "candidates": choice.candidates,
        "rejected": choice.rejected,
    }


async def flip_to_split(app_state: Any, target_prefill: int) -> list[dict[str, Any]]:
    """Flip the least busy instances of the pool that is too large until the prefill pool has
    `target_prefill` instances; the flips' results, in order."""
    pool = pd_pool(app_state)
    prefill = [i for i in pool if i.role == "prefill"]
    decode = [i for i in pool if i.role == "decode"]
    if len(prefill) > target_prefill:
        moves, to_role = sorted(prefill, key=_busy)[: len(prefill) - target_prefill], "decode"
    else:
        moves, to_role = sorted(decode, key=_busy)[: target_prefill - len(prefill)], "prefill"
    flips = []
    for inst in moves:
        try:
            flips.append(await app_state.flip(inst, to_role))
        except BackendError as exc:
            raise APIError(exc.status if exc.status < 500 else 502, f"flip of {inst.id} failed: {exc}",
                           code="flip_failed") from exc  # fmt: skip
    return flips


class AutoPlanner:
    """Every `plan_auto_interval_s`: plan from the last `plan_auto_window_s` of traffic with the
    deployment's `plan_objective`, and flip the pools to the recommended split once two plans in a
    row recommend the same split and it differs from the pools' (one plan's noise flips nothing)."""

    def __init__(self, app_state: Any) -> None:
        self.app_state = app_state
        self.last: tuple[int, int] | None = None
        self.applied = 0

    async def tick(self) -> dict[str, Any] | None:
        state, s = self.app_state, self.app_state.settings
        if state.planning.locked() or state.flips_running:
            return None
        async with state.planning:
            try:
                plan = await asyncio.to_thread(
                    recommend_for_traffic, state, s.plan_auto_window_s, s.plan_objective, s.plan_profile, None,
                    s.plan_ttft_slo_ms,
                )  # fmt: skip
            except APIError as exc:  # too little traffic, nothing to divide: nothing to do yet
                log.debug("automatic plan skipped: %s", exc)
                self.last = None
                return None
        rec = (plan["recommended"]["prefill"], plan["recommended"]["decode"])
        pool = pd_pool(state)
        now = (sum(1 for i in pool if i.role == "prefill"), sum(1 for i in pool if i.role == "decode"))
        agreed, self.last = rec == self.last, rec
        if not agreed or rec == now:
            return None
        flips = await flip_to_split(state, rec[0])
        self.applied += 1
        state.event("plan_applied", None, {"from": list(now), "to": list(rec), "flips": [f["id"] for f in flips]})
        return {**plan, "flips": flips}


def pd_pool(app_state: Any) -> list[Any]:
    return [i for i in app_state.cluster.instances.values() if i.role in ("prefill", "decode") and i.state == "healthy"]


def _busy(inst: Any) -> tuple[int, int, str]:
    view = inst.view()
    return view.running + view.queued, view.queued_prompt_tokens + view.running_prompt_tokens, inst.id
