"""`GET /admin/plan`: the split the recent traffic calls for, simulated on the deployment's profile."""

from __future__ import annotations

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
    for params, field in (({"profile": "tpu-v9"}, "profile"), ({"objective": "p99"}, "objective")):
        bad = httpx.get(plan, headers=AUTH, params=params, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field

    # Light prompts, long outputs at 30 req/s: on 4 H100-class instances the TTFT objective keeps a
    # prefill pool, the JCT objective co-locates everything (as in tests/test_sim.py).
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
    assert got["ttft"]["recommended"]["prefill"] >= 1
    assert got["jct"]["recommended"] == {"prefill": 0, "decode": 4}
    # Without `instances` it plans for the registered, healthy instances.
    own = httpx.get(plan, headers=AUTH, params={"profile": "h100-llama-2-7b"}, timeout=120).json()
    assert own["instances"] == 2 and set(own["candidates"]) <= {"0:2", "1:1"}
