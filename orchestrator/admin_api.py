"""Admin REST API (bearer token from TETRI_ADMIN_TOKEN): instances, requests, flips, drains, stats."""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from backends.base import BackendError, Role
from orchestrator.config import BackendKind, InstanceSpec
from orchestrator.errors import APIError


class RegisterBody(BaseModel):
    url: str
    backend: BackendKind = "native"
    role: Role = "colocated"
    model: str | None = None
    id: str | None = None
    options: dict[str, Any] = {}


class FlipBody(BaseModel):
    role: Role | None = None


def build_admin_router(app_state: Any) -> APIRouter:
    def require_token(request: Request) -> None:
        token = app_state.settings.admin_token
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not token or not given or not hmac.compare_digest(given, token):
            raise APIError(401, "admin API needs 'Authorization: Bearer <TETRI_ADMIN_TOKEN>'",
                           "authentication_error", code="invalid_admin_token")

    router = APIRouter(prefix="/admin", dependencies=[Depends(require_token)])
    # A plan simulates thousands of requests per candidate (seconds of CPU): one at a time.
    planning = asyncio.Lock()

    async def planned(
        window_s: float, objective: str, profile: str | None, instances: int | None, ttft_slo_ms: float | None
    ) -> dict[str, Any]:
        slo = ttft_slo_ms if ttft_slo_ms is not None else app_state.settings.plan_ttft_slo_ms
        _check_plan_args(window_s, objective, profile or app_state.settings.plan_profile, instances, slo)
        if planning.locked():
            raise APIError(429, "a plan is already being computed; retry shortly", "rate_limit_error",
                           code="plan_in_progress", retry_after=5)  # fmt: skip
        async with planning:
            return await asyncio.to_thread(
                recommend_for_traffic, app_state, window_s, objective, profile or app_state.settings.plan_profile,
                instances, slo,
            )  # fmt: skip

    def instance_or_404(instance_id: str):
        inst = app_state.cluster.get(instance_id)
        if inst is None:
            raise APIError(404, f"no instance {instance_id!r}", code="instance_not_found")
        return inst

    @router.get("/instances")
    async def list_instances() -> dict[str, Any]:
        return {"instances": [i.describe() for i in app_state.cluster.instances.values()]}

    @router.post("/instances", status_code=201)
    async def register(body: RegisterBody) -> dict[str, Any]:
        spec = InstanceSpec(**body.model_dump())
        try:
            inst = await app_state.register(spec)
        except ValueError as exc:
            raise APIError(409, str(exc), code="instance_conflict") from exc
        except BackendError as exc:
            raise APIError(exc.status if 400 <= exc.status < 500 else 502, str(exc), code="instance_unhealthy") from exc
        return inst.describe()

    @router.delete("/instances/{instance_id}")
    async def deregister(instance_id: str) -> dict[str, Any]:
        inst = instance_or_404(instance_id)
        return await app_state.deregister(inst)

    @router.post("/instances/{instance_id}/drain")
    async def drain(instance_id: str, accepting: bool = False) -> dict[str, Any]:
        inst = instance_or_404(instance_id)
        started = time.perf_counter()
        try:
            result = await inst.backend.drain(accepting)
        except BackendError as exc:
            raise APIError(exc.status if exc.status < 500 else 502, str(exc)) from exc
        inst.state = "healthy" if accepting else "draining"
        app_state.event("drain" if not accepting else "undrain", inst.id, result, time.perf_counter() - started)
        return {"id": inst.id, "state": inst.state, **result}

    @router.post("/instances/{instance_id}/flip")
    async def flip(instance_id: str, body: FlipBody | None = None) -> dict[str, Any]:
        inst = instance_or_404(instance_id)
        target = (body.role if body and body.role else None) or ("decode" if inst.role == "prefill" else "prefill")
        try:
            return await app_state.flip(inst, target)
        except BackendError as exc:
            raise APIError(exc.status if exc.status < 500 else 502, str(exc), code="flip_failed") from exc

    @router.get("/requests/{request_id}")
    async def get_request(request_id: str) -> dict[str, Any]:
        row = await asyncio.to_thread(app_state.request_record, request_id)
        if row is None:
            raise APIError(404, f"no request {request_id!r}", code="request_not_found")
        return row

    @router.get("/events")
    async def events(kind: str | None = None, limit: int = 100) -> dict[str, Any]:
        return {"events": await asyncio.to_thread(app_state.store.list_events, kind=kind, limit=limit)}

    @router.get("/plan")
    async def plan(
        window_s: float = 900.0, objective: str = "balanced", profile: str | None = None, instances: int | None = None,
        ttft_slo_ms: float | None = None,
    ) -> dict[str, Any]:
        """The prefill:decode split (P = 0: every request co-located) the recent traffic calls for,
        simulated on the deployment's timing profile. Advice only: apply it with /instances/{id}/flip.
        `objective=slo`: the least mean JCT whose p99 TTFT meets `ttft_slo_ms` (default: the
        deployment's `plan_ttft_slo_ms`)."""
        return await planned(window_s, objective, profile, instances, ttft_slo_ms)

    @router.post("/plan/apply")
    async def apply_plan(
        window_s: float = 900.0, objective: str = "balanced", profile: str | None = None,
        ttft_slo_ms: float | None = None,
    ) -> dict[str, Any]:
        """Plan the prefill/decode pools (co-located instances stay as they are) and flip instances,
        one at a time, until the pools have the recommended split."""
        pool = _pd_pool(app_state)
        if not pool:
            raise APIError(409, "no healthy prefill or decode instances to divide", code="no_instances")
        plan = await planned(window_s, objective, profile, len(pool), ttft_slo_ms)
        target = plan["recommended"]["prefill"]
        prefill = [i for i in pool if i.role == "prefill"]
        decode = [i for i in pool if i.role == "decode"]
        # Flip the least busy instances of the pool that is too large.
        flips = []
        if len(prefill) > target:
            moves, to_role = sorted(prefill, key=_busy)[: len(prefill) - target], "decode"
        else:
            moves, to_role = sorted(decode, key=_busy)[: target - len(prefill)], "prefill"
        for inst in moves:
            try:
                flips.append(await app_state.flip(inst, to_role))
            except BackendError as exc:
                raise APIError(exc.status if exc.status < 500 else 502, f"flip of {inst.id} failed: {exc}",
                               code="flip_failed") from exc  # fmt: skip
        return {**plan, "flips": flips}

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        return await asyncio.to_thread(app_state.stats)

    return router


def recommend_for_traffic(
    app_state: Any, window_s: float, objective: str, profile: str, instances: int | None, ttft_slo_ms: float = 200.0
) -> dict[str, Any]:
    from backends.sim.cluster import system_config
    from backends.sim.planner import colocated_by_rule, layout_utilisation, recommend_split
    from backends.sim.profiles import get_timing

    current: dict[str, int] = {}
    for inst in app_state.cluster.instances.values():
        if inst.state != "unhealthy":
            current[inst.role] = current.get(inst.role, 0) + 1
    pool = _pd_pool(app_state)
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


_MAX_PLAN_INSTANCES = 512  # a plan simulates every instance: bound the work one request can ask for


def _check_plan_args(window_s: float, objective: str, profile: str, instances: int | None, ttft_slo_ms: float) -> None:
    from backends.sim.planner import OBJECTIVES
    from backends.sim.profiles import profile_names

    if objective not in OBJECTIVES:
        raise APIError(400, f"objective must be one of {', '.join(OBJECTIVES)}", param="objective")
    if profile not in profile_names():
        raise APIError(400, f"unknown profile {profile!r}; known: {', '.join(profile_names())}", param="profile")
    if not window_s > 0:
        raise APIError(400, "window_s must be positive", param="window_s")
    if not 0 < ttft_slo_ms < math.inf:
        raise APIError(400, "ttft_slo_ms must be a positive number of milliseconds", param="ttft_slo_ms")
    if instances is not None and not 1 <= instances <= _MAX_PLAN_INSTANCES:
        raise APIError(400, f"instances must be between 1 and {_MAX_PLAN_INSTANCES}", param="instances")


def _pd_pool(app_state: Any) -> list[Any]:
    return [i for i in app_state.cluster.instances.values() if i.role in ("prefill", "decode") and i.state == "healthy"]


def _busy(inst: Any) -> tuple[int, int, str]:
    view = inst.view()
    return view.running + view.queued, view.queued_prompt_tokens + view.running_prompt_tokens, inst.id
