"""`GET /admin/plan`: the split the recent traffic calls for, simulated on the deployment's profile."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, pd_specs

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _record_traffic(store, n: int, rate: float, prompts: tuple[int, int], outputs: tuple[int, int]) -> None:
    rng = random.Random(0)
    t = time.time() - n / rate
    for i in range(n):
        t += rng.expovariate(rate)
        store.save_request(f"past-{i}", state="finished", arrival=t, prompt_tokens=rng.randint(*prompts),
                           completion_tokens=rng.randint(*outputs))  # fmt: skip
    assert store.flush(10.0)


@pytest.mark.slow
def test_plan_recommends_a_split_for_the_recorded_traffic(tiny_pd_fleet, orchestrator_for):
    url, state = orchestrator_for(pd_specs(tiny_pd_fleet))
    plan = f"{url}/admin/plan"
    assert httpx.get(plan, timeout=30).status_code == 401
    empty = httpx.get(plan, headers=AUTH, params={"profile": "h100-llama-2-7b"}, timeout=30)
    assert empty.status_code == 409 and empty.json()["error"]["code"] == "not_enough_traffic"
    bad = (({"profile": "tpu-v9"}, "profile"), ({"objective": "p99"}, "objective"), ({"instances": 0}, "instances"),
           ({"instances": 100000}, "instances"), ({"window_s": -5}, "window_s"),
           ({"objective": "slo", "ttft_slo_ms": 0}, "ttft_slo_ms"),
           ({"ttft_slo_ms": "inf"}, "ttft_slo_ms"))  # fmt: skip
    for params, field in bad:
        bad = httpx.get(plan, headers=AUTH, params=params, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field

    # Light prompts, long outputs at 30 req/s: on 4 H100-class instances the TTFT objective keeps a
    # prefill pool, the JCT objective co-locates everything (as in tests/unit/test_sim.py).
    _record_traffic(state.store, 900, 30.0, (20, 300), (200, 800))
    got = {}
    for objective in ("ttft", "jct"):
        resp = httpx.get(plan, headers=AUTH, timeout=120,
                         params={"profile": "h100-llama-2-7b", "objective": objective, "instances": 4})  # fmt: skip
        assert resp.status_code == 200, resp.text
        got[objective] = resp.json()
    for body in got.values():
        assert body["current"] == {"prefill": 1, "decode": 1} and body["instances"] == 4
        assert body["traffic"]["requests"] == 900 and 25 < body["traffic"]["rate_rps"] < 36
        rec = body["recommended"]
        assert rec["prefill"] + rec["decode"] == 4 and f"{rec['prefill']}:{rec['decode']}" in body["candidates"]
        # every layout tried is listed with its steady-state utilisation; only ones that keep up are simulated
        assert all(0 < c["util"] < 1 for c in body["candidates"].values())
        assert all(u >= 1 for u in body["rejected"].values())
    assert got["ttft"]["recommended"]["prefill"] >= 1
    assert got["jct"]["recommended"] == {"prefill": 0, "decode": 4}
    # An SLO objective: with a p99 TTFT target no layout can meet, the least p99 TTFT; the target and
    # whether each candidate meets it are in the answer.
    slo = httpx.get(plan, headers=AUTH, timeout=120, params={"profile": "h100-llama-2-7b", "objective": "slo",
                                                              "ttft_slo_ms": 0.001, "instances": 4}).json()  # fmt: skip
    assert slo["ttft_slo_ms"] == 0.001 and not any(c["meets_slo"] for c in slo["candidates"].values())
    best = min(slo["candidates"], key=lambda k: slo["candidates"][k]["p99_ttft_ms"])
    assert f"{slo['recommended']['prefill']}:{slo['recommended']['decode']}" == best
    # The 1:1 pool running now cannot keep up with 30 req/s of ~500-token answers on H100 timing
    # (one decode instance would need ~15k tokens/s); the plan says so.
    assert got["jct"]["current_utilisation"] > 1
    # One plan at a time: a second request while one runs is told to come back (429, Retry-After).
    import concurrent.futures

    def ask() -> httpx.Response:
        return httpx.get(plan, headers=AUTH, timeout=120,
                         params={"profile": "h100-llama-2-7b", "objective": "jct", "instances": 16})  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        both = sorted((f.result() for f in [pool.submit(ask), pool.submit(ask)]), key=lambda r: r.status_code)
        took = time.monotonic() - started
    assert took > 0.5  # the plan runs long enough for the two requests to overlap
    assert [r.status_code for r in both] == [200, 429]
    assert both[1].headers["retry-after"] == "5" and both[1].json()["error"]["code"] == "plan_in_progress"
    # Without `instances` it plans for the registered, healthy instances.
    own = httpx.get(plan, headers=AUTH, params={"profile": "h100-llama-2-7b"}, timeout=120).json()
    assert own["instances"] == 2 and set(own["candidates"]) <= {"0:2", "1:1"}


def test_a_deployment_whose_decode_engines_cannot_run_whole_requests_keeps_a_prefill_pool():
    from backends.engines.simulated.profiles import get_timing
    from orchestrator.sim import system_config
    from orchestrator.sim.planner import recommend_split

    rng = random.Random(0)
    prompts = [rng.randint(20, 300) for _ in range(900)]
    outputs = [rng.randint(200, 800) for _ in range(900)]
    cfg = system_config("tetri", plan_objective="jct")
    h100 = get_timing("h100-llama-2-7b")
    free = recommend_split(4, prompts, outputs, 30.0, h100, cfg)
    assert (free.prefill, free.decode) == (0, 4)  # co-locating everything is best for JCT here...
    kept = recommend_split(4, prompts, outputs, 30.0, h100, cfg, allow_no_prefill=False)
    assert kept.prefill >= 1 and "0:4" not in kept.candidates  # ...but SGLang decode servers cannot
    with pytest.raises(ValueError):
        recommend_split(1, prompts, outputs, 30.0, h100, cfg, allow_no_prefill=False)


@pytest.mark.slow
def test_plan_apply_flips_the_pools_to_the_recommended_split(tiny_pd_fleet, orchestrator_for):
    url, state = orchestrator_for(pd_specs(tiny_pd_fleet))
    # Light prompts, long outputs, 20 req/s on 2 H100-class instances: one decode instance could
    # not keep up, so every objective drops the prefill pool (candidates 0:2 and 1:1).
    _record_traffic(state.store, 900, 20.0, (20, 300), (200, 800))
    try:
        resp = httpx.post(f"{url}/admin/plan/apply", headers=AUTH, params={"profile": "h100-llama-2-7b"},
                          timeout=180)  # fmt: skip
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["recommended"] == {"prefill": 0, "decode": 2}
        assert [(f["id"], f["from"], f["to"]) for f in body["flips"]] == [("prefill-0", "prefill", "decode")]
        roles = {i["id"]: i["role"] for i in httpx.get(f"{url}/admin/instances", headers=AUTH).json()["instances"]}
        assert roles == {"prefill-0": "decode", "decode-1": "decode"}
        # With no prefill pool every request runs co-located on a decode instance.
        done = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "random:tiny-llama", "prompt": [5, 6, 7, 8], "max_tokens": 4, "ignore_eos": True})
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
        again = httpx.post(f"{url}/admin/plan/apply", headers=AUTH, params={"profile": "h100-llama-2-7b"},
                           timeout=180).json()  # fmt: skip
        assert again["flips"] == []  # already there
    finally:  # the fleet is shared by the session: give the worker its role back
        back = httpx.post(f"{url}/admin/instances/prefill-0/flip", headers=AUTH, json={"role": "prefill"},
                          timeout=120)  # fmt: skip
        assert back.status_code == 200, back.text


@pytest.mark.slow
def test_automatic_planner_flips_the_pools_once_two_plans_agree(tiny_pd_fleet, tmp_path):
    """plan_auto_interval_s: the orchestrator plans on a timer and applies a split only when two
    plans in a row recommend it; once the pools match, further plans flip nothing."""
    from orchestrator.app import create_app
    from tests.conftest import make_settings, serve_app

    settings = make_settings(tmp_path, pd_specs(tiny_pd_fleet), plan_profile="h100-llama-2-7b",
                             plan_auto_interval_s=0.5)  # fmt: skip
    app = create_app(settings)
    state = app.state.tetri
    applied = []
    try:
        with serve_app(app) as url:
            # No traffic yet: nothing to plan, nothing flips.
            time.sleep(1.5)
            assert state.auto_planner.applied == 0
            _record_traffic(state.store, 900, 20.0, (20, 300), (200, 800))  # calls for 0:2 (as above)
            deadline = time.monotonic() + 120
            while state.auto_planner.applied == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            roles = {i["id"]: i["role"] for i in httpx.get(f"{url}/admin/instances", headers=AUTH).json()["instances"]}
            assert roles == {"prefill-0": "decode", "decode-1": "decode"}
            time.sleep(1.5)  # more plans, the same answer: the pools already match
            assert state.auto_planner.applied == 1
            applied = httpx.get(f"{url}/admin/events", params={"kind": "plan_applied"}, headers=AUTH).json()["events"]
    finally:  # the fleet is shared by the session: the planner has stopped; give the worker its role back
        httpx.post(f"{tiny_pd_fleet.workers[0].url}/role", json={"role": "prefill"}, timeout=120).raise_for_status()
    assert len(applied) == 1
    detail = applied[0]["detail"]
    detail = json.loads(detail) if isinstance(detail, str) else detail
    assert detail["from"] == [1, 1] and detail["to"] == [0, 2] and detail["flips"] == ["prefill-0"]


def test_automatic_planner_acts_only_on_two_agreeing_plans(monkeypatch):
    """One plan's noise flips nothing; a plan that fails for lack of traffic resets the agreement;
    a split the pools already have is never applied."""
    import asyncio
    from types import SimpleNamespace

    from orchestrator import pool_planner
    from orchestrator.errors import APIError

    script = iter([(0, 2), (1, 1), (0, 2), None, (0, 2), (0, 2), (1, 1), (1, 1)])
    flipped: list[int] = []

    def recommend(*_args):
        rec = next(script)
        if rec is None:
            raise APIError(409, "too little traffic", code="not_enough_traffic")
        return {"recommended": {"prefill": rec[0], "decode": rec[1]}}

    async def flip_to(_state, target):
        flipped.append(target)
        return [{"id": "prefill-0"}]

    monkeypatch.setattr(pool_planner, "recommend_for_traffic", recommend)
    monkeypatch.setattr(pool_planner, "flip_to_split", flip_to)
    pool = [SimpleNamespace(role="prefill"), SimpleNamespace(role="decode")]
    monkeypatch.setattr(pool_planner, "pd_pool", lambda _state: pool)
    events: list[tuple] = []
    state = SimpleNamespace(
        settings=SimpleNamespace(plan_auto_window_s=900.0, plan_objective="balanced", plan_profile="cpu-smollm2",
                                 plan_ttft_slo_ms=200.0),
        planning=asyncio.Lock(), flips_running=False, event=lambda *a: events.append(a),
    )  # fmt: skip
    planner = pool_planner.AutoPlanner(state)

    async def run() -> list:
        return [await planner.tick() is not None for _ in range(8)]

    acted = asyncio.run(run())
    # (0,2) new; (1,1) = the pools; (0,2) new again; no traffic; (0,2) new; (0,2) agrees -> apply;
    # (1,1) and (1,1): agreed on the second, but the pools (1 prefill, 1 decode here) already match.
    assert acted == [False, False, False, False, False, True, False, False]
    assert flipped == [0] and planner.applied == 1
    assert events == [("plan_applied", None, {"from": [1, 1], "to": [0, 2], "flips": ["prefill-0"]})]
