"""TPOT-aware placement (issue 21): the decode batch cap (``decode_max_running``), the TPOT-aware
co-located host pickers (``light_first``, ``tpot_harm``) and the cap's sizing, in the policy core,
the live settings and the simulator."""

from __future__ import annotations

import random

import pytest

from bench.workloads import BenchRequest
from orchestrator.config import Settings
from orchestrator.policies.admission import CappedAdmission, make_admission
from orchestrator.policies.config import PolicyConfig
from orchestrator.policies.core import PlacementCore
from orchestrator.policies.hosts import pick_host
from orchestrator.policies.tpot import batch_cap
from orchestrator.policies.types import InstanceView, RequestView
from orchestrator.sim import ClusterSim, system_config


def view(id: str, *, running: int = 0, light: int = 0, heavy: int = 0, queued: int = 0, load: int = 0) -> InstanceView:
    return InstanceView(id=id, role="decode", total_kv_tokens=100_000, free_kv_tokens=90_000, running=running,
                        light_decodes=light, heavy_decodes=heavy, queued=queued, queued_prompt_tokens=load)  # fmt: skip


REQ = RequestView(id="r", arrival=0.0, prompt_tokens=700, max_tokens=512, predicted_bucket=1)


def test_cap_refuses_at_the_batch_and_keeps_the_base_rule():
    capped = make_admission("reserve_dynamic", max_running=8)
    assert isinstance(capped, CappedAdmission) and capped.name == "reserve_dynamic+cap8"
    assert capped.admits(view("a", running=7), REQ)
    assert not capped.admits(view("a", running=8), REQ)
    full = InstanceView(id="f", role="decode", total_kv_tokens=1000, free_kv_tokens=100)
    assert not capped.admits(full, REQ)  # the base rule still refuses what does not fit
    assert make_admission("greedy").name == "greedy"  # 0: no cap, the policy itself


def test_cap_gates_the_core_dispatch_and_the_hphd_host():
    core = PlacementCore.from_knobs(PolicyConfig(decode_max_running=4, dispatch_policy="least_loaded"))
    busy, idle = view("a", running=4), view("b", running=3)
    assert core.pick_decode(REQ, [busy], random.Random(0)) is None  # waits rather than exceed the cap
    assert core.pick_host(REQ, [busy, idle], "admit") == "b"
    assert core.pick_host(REQ, [busy], "admit") is None


def test_tpot_pickers_keep_prefill_away_from_light_decodes():
    light = view("a", running=10, light=10, load=0)
    heavy = view("b", running=10, heavy=10, load=700)
    assert pick_host([light, heavy], "prefill_load") == "a"  # least prefill work
    assert pick_host([light, heavy], "light_first") == "b"  # fewest decodes a chunk hurts most
    assert pick_host([light, heavy], "tpot_harm") == "b"  # (700 + 1024) x 1 < 1024 x 11
    # tpot_harm still spreads prefill: a deep enough backlog outweighs the light decodes
    deep = view("b", running=10, heavy=10, load=20_000)
    assert pick_host([light, deep], "tpot_harm") == "a"


def test_knob_lives_in_settings_and_the_simulator():
    assert Settings(database_url="sqlite://", decode_max_running=24).policy_config().decode_max_running == 24
    assert Settings(database_url="sqlite://", colocate_pick="tpot_harm").policy_config().colocate_pick == "tpot_harm"
    with pytest.raises(ValueError):
        PolicyConfig(decode_max_running=-1)
    with pytest.raises(ValueError):
        Settings(database_url="sqlite://", decode_max_running=-1)
    cfg = system_config("tetri+decode_max_running=16,colocate_pick=light_first")
    assert (cfg.policy.decode_max_running, cfg.policy.colocate_pick) == (16, "light_first")


def test_batch_cap_is_the_largest_batch_within_the_slo():
    step = lambda b: 0.007 + 0.00018 * b  # noqa: E731  (seconds: a linear decode step)
    assert batch_cap(step, 0.0106) == 20
    assert batch_cap(step, 0.001) == 1
    assert batch_cap(step, 10.0, limit=64) == 64


def test_capped_tetri_keeps_every_batch_under_the_cap_in_the_simulator(h100):
    reqs = [BenchRequest(f"r{i}", i * 0.005, 100 + (i * 37) % 1500, 20 + (i * 53) % 400) for i in range(300)]
    peaks = {}
    for cap in (0, 6):
        sim = ClusterSim(system_config(f"tetri+pd_ratio=0:2,late_binding=none,decode_max_running={cap}"), h100, 2, reqs)
        form, peak = sim.batcher.form, [0]

        def watch(inst, now, form=form, peak=peak):
            batch = form(inst, now)
            peak[0] = max(peak[0], len(inst.running) + len(inst.prefilling))
            return batch

        sim.batcher.form = watch  # type: ignore[method-assign]
        res = sim.run()
        assert sum(1 for r in res.requests if r.get("error") is None) == len(reqs)
        peaks[cap] = peak[0]
    assert peaks[6] <= 6 < peaks[0]


@pytest.fixture(scope="module")
def h100():
    from backends.engines.simulated.profiles import get_timing

    return get_timing("h100-llama-2-7b")


def test_isolation_puts_heavy_requests_on_their_own_hosts():
    from orchestrator.policies.tpot import Isolation, pick_isolated, predicted_weight

    heavy = RequestView(id="h", arrival=0.0, prompt_tokens=2000, max_tokens=2048, predicted_bucket=3)
    light = RequestView(id="l", arrival=0.0, prompt_tokens=300, max_tokens=2048, predicted_bucket=0)
    unknown = RequestView(id="u", arrival=0.0, prompt_tokens=3000, max_tokens=2048)
    assert predicted_weight(heavy) == 700 * (2000 + 350) and predicted_weight(light) == 100 * (300 + 50)
    assert predicted_weight(unknown) == 0  # no prediction: light
    iso = Isolation(weight=1_000_000, share=0.25)
    hosts = [view(f"d{i}", load=100 * (8 - i)) for i in range(8)]  # d7 has the least prefill work
    assert [h.id for h in iso.group(heavy, hosts)] == ["d0", "d1"]
    assert pick_isolated(heavy, hosts, "prefill_load", iso) == "d1"
    assert pick_isolated(light, hosts, "prefill_load", iso) == "d7"
    assert pick_isolated(heavy, hosts, "prefill_load", None) == "d7"  # off: one pool
    assert iso.group(heavy, hosts[4:]) == hosts[4:5]  # re-formed among those offered: 4 x 0.25 = 1
    assert iso.group(heavy, hosts[:1]) == hosts[:1]  # one host: no groups
    knobs = PolicyConfig(global_scheduler="least_loaded", tpot_isolate_weight=1_000_000, tpot_isolate_share=0.25)
    core = PlacementCore.from_knobs(knobs)
    assert core.pick_prefill(heavy, "colocated", hosts) == "d1"
    assert core.pick_host(light, hosts, None) == "d7"
    with pytest.raises(ValueError):
        PolicyConfig(tpot_isolate_share=1.0)
    s = Settings(database_url="sqlite://", tpot_isolate_weight=5, tpot_isolate_share=0.5).policy_config()
    assert (s.tpot_isolate_weight, s.tpot_isolate_share) == (5, 0.5)
