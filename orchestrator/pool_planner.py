"""Sizing the prefill and decode pools from recent traffic: the plan (`GET /admin/plan`), its
application (`POST /admin/plan/apply`: flip the least busy instances until the pools match), and,
when `plan_auto_interval_s` is set, the same two steps on a timer (`AutoPlanner`). With `plan_scale`
and a pool provider that can scale, the timer may also add or remove an instance (`scaled_target`,
`apply_layout`): opt-in, within `plan_scale_min`/`plan_scale_max` per pool, each action an event.

The plan simulates the candidate splits on the deployment's timing profile (orchestrator/sim/planner.py);
it is as good as that profile. Applying it drains and flips instances, so the automatic planner
only acts on a split that two plans in a row agree on, and never while a plan or a flip is running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from backends.base import BackendError, Role
from orchestrator.errors import APIError
from orchestrator.pools.base import PoolProvider, ScaleRefused

log = logging.getLogger("tetri.plan")


def recommend_for_traffic(
    app_state: Any, window_s: float, objective: str, profile: str, instances: int | None, ttft_slo_ms: float
) -> dict[str, Any]:
    """The split the finished requests of the last `window_s` call for (what GET /admin/plan
    answers); APIError 409 when there is too little traffic or nothing to divide."""
    from backends.engines.simulated.profiles import get_timing
    from orchestrator.sim.config import deployed_system
    from orchestrator.sim.planner import recommend_split
    from orchestrator.sim.split import colocated_by_rule, layout_utilisation

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
    # The system that is deployed: its own policies (Settings.policy_config()), not a preset.
    cfg = deployed_system(s.policy_config(), plan_objective=objective, plan_ttft_slo_ms=ttft_slo_ms)
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
        "policy": cfg.policy.to_dict(),  # what was simulated: the deployment's own policies
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
        provider = scaling_provider(state)
        if provider is not None:
            if not await _settled(provider):  # instances still coming up or leaving: wait for them
                return None
            async with state.planning:
                plan, rec = await scaled_target(state, plan, rec)
        agreed, self.last = rec == self.last, rec
        if not agreed or rec == now:
            return None
        if provider is None:
            flips = await flip_to_split(state, rec[0])
            scaled: list[dict[str, Any]] = []
        else:
            flips, scaled = await apply_layout(state, provider, now, rec)
        self.applied += 1
        state.event("plan_applied", None, {"from": list(now), "to": list(rec), "flips": [f["id"] for f in flips],
                                           **({"scaled": scaled} if scaled else {})})  # fmt: skip
        return {**plan, "flips": flips, **({"scaled": scaled} if scaled else {})}


def pd_pool(app_state: Any) -> list[Any]:
    return [i for i in app_state.cluster.instances.values() if i.role in ("prefill", "decode") and i.state == "healthy"]


def _busy(inst: Any) -> tuple[int, int, str]:
    view = inst.view()
    return view.running + view.queued, view.queued_prompt_tokens + view.running_prompt_tokens, inst.id


# ---- scaling through a pool provider (plan_scale) ------------------------------------------------


def scaling_provider(app_state: Any) -> PoolProvider | None:
    """The pool provider the automatic planner may scale through: only with `plan_scale` on."""
    provider: PoolProvider | None = getattr(app_state, "pool_provider", None)
    if provider is None or not app_state.settings.plan_scale:
        return None
    return provider


async def _settled(provider: PoolProvider) -> bool:
    """Every pool has what was last asked for (a scale still under way is not re-planned)."""
    return all(p.ready == p.desired for p in await provider.pools() if p.role in ("prefill", "decode"))


def split_util(plan: dict[str, Any], split: tuple[int, int]) -> float | None:
    """The planned utilisation (the busier pool's) of a split, from the plan's candidates."""
    key = f"{split[0]}:{split[1]}"
    cand = plan.get("candidates", {}).get(key)
    if cand is not None and "util" in cand:
        return float(cand["util"])
    rejected = plan.get("rejected", {})
    return float(rejected[key]) if key in rejected else None


def clamp_split(settings: Any, split: tuple[int, int]) -> tuple[int, int]:
    lo, hi = settings.plan_scale_min, settings.plan_scale_max
    p = min(max(split[0], lo.get("prefill", 0)), hi.get("prefill", split[0]))
    d = min(max(split[1], lo.get("decode", 1)), hi.get("decode", split[1]))
    return p, d


async def scaled_target(
    app_state: Any, plan: dict[str, Any], rec: tuple[int, int]
) -> tuple[dict[str, Any], tuple[int, int]]:
    """One instance more when the recommended split runs its busier pool at >= plan_scale_up_util,
    one fewer when the split recommended for one fewer stays at <= plan_scale_down_util; then each
    pool clamped to its [min, max]. The plan the target comes from, and the target."""
    s = app_state.settings
    n = rec[0] + rec[1]
    util = split_util(plan, rec)
    hi_total = s.plan_scale_max.get("prefill", 0) + s.plan_scale_max.get("decode", 0)
    lo_total = s.plan_scale_min.get("prefill", 0) + s.plan_scale_min.get("decode", 1)
    other: int | None = None
    if util is not None and util >= s.plan_scale_up_util and n < hi_total:
        other = n + 1
    elif util is not None and util <= s.plan_scale_down_util and n > max(1, lo_total):
        other = n - 1
    if other is not None:
        try:
            alt = await asyncio.to_thread(
                recommend_for_traffic, app_state, s.plan_auto_window_s, s.plan_objective, s.plan_profile, other,
                s.plan_ttft_slo_ms,
            )  # fmt: skip
        except APIError as exc:
            log.debug("planning for %d instances failed: %s", other, exc)
            alt = None
        if alt is not None:
            alt_rec = (alt["recommended"]["prefill"], alt["recommended"]["decode"])
            alt_util = split_util(alt, alt_rec)
            # Fewer instances only where they keep up comfortably; more whenever asked for.
            if other > n or (alt_util is not None and alt_util <= s.plan_scale_down_util):
                plan, rec = alt, alt_rec
    return plan, clamp_split(s, rec)


async def apply_layout(
    app_state: Any, provider: PoolProvider, now: tuple[int, int], target: tuple[int, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Move the pools from `now` to `target`: flips where one pool gives what the other lacks (no
    start-up, no model load), the rest through the provider (it drains an instance before it stops
    it). Each scale action is an event row ("plan_scale", or "plan_scale_refused"). The flips and the
    scale actions."""
    p, d = now
    flips: list[dict[str, Any]] = []
    give = 0  # instances flipped decode -> prefill (negative: the other way)
    if target[0] > p and target[1] < d:
        give = min(target[0] - p, d - target[1])
    elif target[0] < p and target[1] > d:
        give = -min(p - target[0], target[1] - d)
    if give != 0:
        flips = await flip_to_split(app_state, p + give)
        p, d = p + give, d - give
    scaled: list[dict[str, Any]] = []
    statuses = {st.role: st for st in await provider.pools()}
    pools: tuple[tuple[Role, int, int], ...] = (("prefill", p, target[0]), ("decode", d, target[1]))
    for role, have, want in pools:
        if want == have:
            continue
        status = statuses.get(role)
        replicas = max(0, (status.desired if status is not None else have) + want - have)
        detail = {"role": role, "from": have, "to": want, "replicas": replicas, "provider": provider.name}
        try:
            await provider.scale(role, replicas)
        except ScaleRefused as exc:
            app_state.event("plan_scale_refused", None, {**detail, "reason": str(exc)})
            log.warning("the planner's scaling of the %s pool was refused: %s", role, exc)
            continue
        app_state.event("plan_scale", None, detail)
        scaled.append(detail)
    return flips, scaled
