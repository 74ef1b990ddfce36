"""The automatic planner scaling pools through a provider (plan_scale): opt-in, one instance more
when the planned split runs hot, one fewer when a smaller layout keeps up comfortably, each pool
within its min and max, flips before starts, every action an event row; nothing while a scale is
still under way. The plans are scripted; the provider is a recording stand-in for the local one
(tests/e2e/test_pools_local.py runs the real one)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator import pool_planner
from orchestrator.config import Settings
from orchestrator.errors import APIError
from orchestrator.pools.base import POOL_ROLES, PoolStatus, ScaleRefused


class RecordingProvider:
    """Its pools are the cluster's members (flips move them, as the local provider follows a
    worker's role); `scale` adds or removes members at once, unless `pending` says a pool is still
    coming up (ready < desired)."""

    name = "recording"

    def __init__(self, refuse: bool = False) -> None:
        self.members: list[SimpleNamespace] = []
        self.pending = False
        self.refuse = refuse
        self.calls: list[tuple[str, int]] = []

    def count(self, role: str) -> int:
        return sum(m.role == role for m in self.members)

    async def pools(self) -> list[PoolStatus]:
        return [PoolStatus(r, self.count(r), self.count(r) - (1 if self.pending else 0), True) for r in POOL_ROLES]

    async def scale(self, role: str, replicas: int) -> PoolStatus:
        if self.refuse:
            raise ScaleRefused("no room")
        self.calls.append((role, replicas))
        have = [m for m in self.members if m.role == role]
        for _ in range(replicas - len(have)):
            self.members.append(SimpleNamespace(role=role))
        for m in have[: max(0, len(have) - replicas)]:
            self.members.remove(m)
        return PoolStatus(role, replicas, replicas, True)  # type: ignore[arg-type]


def _plan(p: int, d: int, util: float) -> dict[str, Any]:
    return {"recommended": {"prefill": p, "decode": d}, "candidates": {f"{p}:{d}": {"util": util}}, "rejected": {}}


def _state(monkeypatch: pytest.MonkeyPatch, pools: dict[str, int], plans: dict[int, dict[str, Any]],
           provider: RecordingProvider | None, **settings: Any) -> SimpleNamespace:  # fmt: skip
    """An app state whose pools hold `pools`, whose plan for n instances is `plans[n]` (None for
    the current n), and whose flips move instances between the pools."""
    members = [SimpleNamespace(role=r) for r, k in pools.items() for _ in range(k)]
    if provider is not None:
        provider.members = members

    def recommend(_state: Any, _window: float, _obj: str, _profile: str, instances: int | None, _slo: float):
        n = instances if instances is not None else len(members)
        if n not in plans:
            raise APIError(409, "too little traffic", code="not_enough_traffic")
        return plans[n]

    async def flip_to(_state: Any, target_prefill: int) -> list[dict[str, Any]]:
        flips = []
        while sum(m.role == "prefill" for m in members) != target_prefill:
            up = sum(m.role == "prefill" for m in members) < target_prefill
            m = next(m for m in members if m.role == ("decode" if up else "prefill"))
            m.role = "prefill" if up else "decode"
            flips.append({"id": f"{m.role}-flipped"})
        return flips

    monkeypatch.setattr(pool_planner, "recommend_for_traffic", recommend)
    monkeypatch.setattr(pool_planner, "flip_to_split", flip_to)
    monkeypatch.setattr(pool_planner, "pd_pool", lambda _state: list(members))
    events: list[tuple] = []
    state = SimpleNamespace(
        settings=Settings(plan_scale=True, **settings), planning=asyncio.Lock(), flips_running=False,
        event=lambda *a: events.append(a), pool_provider=provider, events=events, members=members,
    )  # fmt: skip
    return state


def _ticks(state: SimpleNamespace, k: int) -> list[dict[str, Any] | None]:
    planner = pool_planner.AutoPlanner(state)

    async def run() -> list[dict[str, Any] | None]:
        return [await planner.tick() for _ in range(k)]

    return asyncio.run(run())


def _kinds(state: SimpleNamespace) -> list[str]:
    return [e[0] for e in state.events]


def test_a_hot_pool_gains_an_instance_once_two_plans_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = RecordingProvider()
    plans = {2: _plan(1, 1, 0.95), 3: _plan(1, 2, 0.6)}
    state = _state(monkeypatch, {"prefill": 1, "decode": 1}, plans, provider)
    results = _ticks(state, 3)
    assert [r is not None for r in results] == [False, True, False]  # agreed on the 2nd; then the pools match
    assert provider.calls == [("decode", 2)]
    scale_events = [e for e in state.events if e[0] == "plan_scale"]
    assert scale_events == [("plan_scale", None, {"role": "decode", "from": 1, "to": 2, "replicas": 2,
                                                  "provider": "recording"})]  # fmt: skip
    applied = [e for e in state.events if e[0] == "plan_applied"][0][2]
    assert applied["from"] == [1, 1] and applied["to"] == [1, 2] and applied["scaled"][0]["role"] == "decode"


def test_an_idle_layout_loses_an_instance_but_never_below_the_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = RecordingProvider()
    plans = {4: _plan(1, 3, 0.2), 3: _plan(1, 2, 0.3), 2: _plan(1, 1, 0.45)}
    state = _state(
        monkeypatch, {"prefill": 1, "decode": 3}, plans, provider, plan_scale_min={"prefill": 1, "decode": 2}
    )
    _ticks(state, 6)
    # 4 -> 3 instances (the plan for 3 keeps up at 0.3 <= 0.5); then 1:1 is below decode's minimum.
    assert provider.calls == [("decode", 2)]
    assert sum(m.role == "decode" for m in state.members) == 2


def test_the_maximum_caps_growth_and_an_uncomfortable_smaller_layout_is_not_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider = RecordingProvider()
    state = _state(monkeypatch, {"prefill": 1, "decode": 2}, {3: _plan(1, 2, 0.97), 4: _plan(1, 3, 0.7)}, provider,
                   plan_scale_max={"prefill": 1, "decode": 2})  # fmt: skip
    _ticks(state, 3)
    assert provider.calls == [] and "plan_scale" not in _kinds(state)
    provider2 = RecordingProvider()
    plans = {3: _plan(1, 2, 0.4), 2: _plan(1, 1, 0.8)}  # one fewer would run hot: stay
    state2 = _state(monkeypatch, {"prefill": 1, "decode": 2}, plans, provider2)
    _ticks(state2, 3)
    assert provider2.calls == []


def test_flips_first_then_the_provider_for_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """From 2:1 to 1:3: one prefill instance flips to decode (no start-up), one decode instance starts."""
    provider = RecordingProvider()
    state = _state(monkeypatch, {"prefill": 2, "decode": 1}, {}, provider)

    async def apply() -> tuple[list, list]:
        return await pool_planner.apply_layout(state, provider, (2, 1), (1, 3))

    flips, scaled = asyncio.run(apply())
    assert len(flips) == 1
    assert [(s["role"], s["from"], s["to"]) for s in scaled] == [("decode", 2, 3)]
    assert provider.calls == [("decode", 3)]  # the decode pool after the flip (2) + the one missing
    assert sorted(m.role for m in state.members) == ["decode", "decode", "decode", "prefill"]


def test_nothing_while_a_scale_is_under_way_and_a_refusal_is_an_event(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = RecordingProvider()
    provider.pending = True
    state = _state(monkeypatch, {"prefill": 1, "decode": 1}, {2: _plan(1, 1, 0.95), 3: _plan(1, 2, 0.6)}, provider)
    assert _ticks(state, 3) == [None, None, None] and provider.calls == []
    refusing = RecordingProvider(refuse=True)
    state2 = _state(monkeypatch, {"prefill": 1, "decode": 1}, {2: _plan(1, 1, 0.95), 3: _plan(1, 2, 0.6)}, refusing)
    _ticks(state2, 2)
    refused = [e for e in state2.events if e[0] == "plan_scale_refused"]
    assert len(refused) == 1 and refused[0][2]["reason"] == "no room"


def test_off_by_default_the_planner_only_flips(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = RecordingProvider()
    state = _state(monkeypatch, {"prefill": 1, "decode": 1}, {2: _plan(0, 2, 0.95), 3: _plan(1, 2, 0.6)}, provider)
    state.settings = Settings()  # plan_scale off
    _ticks(state, 2)
    assert provider.calls == [] and sorted(m.role for m in state.members) == ["decode", "decode"]


@pytest.mark.slow
def test_the_automatic_planner_grows_a_real_local_pool(tmp_path: Path) -> None:
    """End to end: recorded traffic too heavy for 1 prefill + 1 decode worker; the automatic planner
    (plan_scale, decode at most 2) asks the local provider for a second decode worker, which starts,
    registers and takes the pools to 1:2; then it stays there (the maximum), all of it as events."""
    import random
    import time

    import httpx

    from orchestrator.app import create_app
    from orchestrator.config import InstanceSpec
    from orchestrator.launcher import process_fleet
    from tests.conftest import ADMIN_TOKEN, TINY, make_settings, serve_app

    fleet = process_fleet()
    try:
        for role in ("prefill", "decode"):
            fleet.start_worker(role, TINY, chunk_size="16", kv_tokens=2048, log_dir=tmp_path)  # type: ignore[arg-type]
        fleet.wait_healthy(timeout_s=300)
        specs = [InstanceSpec(url=w.url, backend="native", role=w.role, model=TINY, id=f"{w.role}-{i}")
                 for i, w in enumerate(fleet.workers)]  # fmt: skip
        settings = make_settings(
            tmp_path, specs, pool_provider="local", local_worker_chunk_size="16", local_worker_kv_tokens=2048,
            local_worker_log_dir=str(tmp_path), plan_profile="h100-llama-2-7b", plan_auto_interval_s=0.5,
            plan_scale=True, plan_scale_max={"prefill": 1, "decode": 2},
        )  # fmt: skip
        app = create_app(settings)
        state = app.state.tetri
        with serve_app(app) as url:
            rng = random.Random(0)
            t = time.time() - 900 / 60.0
            for i in range(900):  # 60 req/s of 20-300 prompt, 200-800 output tokens: 0:2 runs at 1.8
                t += rng.expovariate(60.0)
                state.store.save_request(f"past-{i}", state="finished", arrival=t, prompt_tokens=rng.randint(20, 300),
                                         completion_tokens=rng.randint(200, 800))  # fmt: skip
            assert state.store.flush(10.0)
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

            def decode_ready() -> int:
                pools = httpx.get(f"{url}/admin/pools", headers=auth).json()["pools"]
                return next(p["registered"] for p in pools if p["role"] == "decode")

            deadline = time.monotonic() + 180
            while decode_ready() < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert decode_ready() == 2
            time.sleep(2.0)  # more plans: the pools are at the maximum, nothing more happens
            events = httpx.get(f"{url}/admin/events", params={"kind": "plan_scale"}, headers=auth).json()["events"]
            pools = httpx.get(f"{url}/admin/pools", headers=auth).json()["pools"]
        assert [e["detail"] for e in events] == [
            {"role": "decode", "from": 1, "to": 2, "replicas": 2, "provider": "local"}
        ]  # fmt: skip
        assert {p["role"]: p["registered"] for p in pools} == {"prefill": 1, "decode": 2, "colocated": 0}
    finally:
        fleet.stop()
