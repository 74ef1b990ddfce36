"""One policy configuration (issue 17, item 2): the policy registry, PolicyConfig, Settings.policy_config()
and the simulator's systems as overrides of the deployed policy."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from bench.workloads import BenchRequest
from orchestrator.config import Settings
from orchestrator.policies import registry
from orchestrator.policies.config import POLICY_KNOBS, PolicyConfig
from orchestrator.policies.dispatch import make_dispatcher
from orchestrator.sim import SYSTEMS, ClusterSim, system_config
from orchestrator.sim.config import deployed_system
from orchestrator.sim.planner import recommend_split


def test_registry_names_build_and_reject():
    assert registry.names("dispatch_policy")[0] == "power_of_two"
    with pytest.raises(ValueError, match="unknown dispatch_policy 'nope'; choose one of power_of_two"):
        registry.check("dispatch_policy", "nope")
    # build() hands each policy the knobs its constructor takes: round_robin has no power_of_d.
    assert make_dispatcher("round_robin", power_of_d=3).name == "round_robin"
    assert make_dispatcher("power_of_two", power_of_d=3).power_of_d == 3  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("dispatch_policy", "random")(object)


def test_settings_build_the_policy_config_with_every_knob():
    s = Settings(database_url="sqlite://", prefill_policy="sjf", colocate_backlog_tokens=900, flip_policy="idle")
    p = s.policy_config()
    assert (p.prefill_policy, p.colocate_backlog_tokens, p.flip_policy) == ("sjf", 900, "idle")
    for f in fields(PolicyConfig):  # every knob is a Settings field with the same default
        assert Settings.model_fields[f.name].default == f.default, f.name
    assert Settings(database_url="sqlite://").policy_config() == PolicyConfig()
    for knob, reg in POLICY_KNOBS.items():
        with pytest.raises(ValueError, match=f"unknown {reg}"):
            PolicyConfig(**{knob: "nope"})


def test_systems_are_named_overrides_of_the_deployed_policy():
    default = PolicyConfig()
    changed = {f.name for f in fields(PolicyConfig) if getattr(SYSTEMS["tetri"].policy, f.name) != f.default}
    assert changed == {"prefill_policy", "flip_policy"}  # the paper's SJF queue and idle flip
    assert SYSTEMS["colocated-vllm"].policy == SYSTEMS["disagg-simple"].policy != default
    base = SYSTEMS["disagg-simple"].policy
    assert (base.late_binding, base.decode_admission, base.colocate_heavy_heavy, base.colocate_backlog_tokens) == (
        "none", "greedy", False, 0,
    )  # fmt: skip


def _reqs(n: int = 200) -> list[BenchRequest]:
    return [BenchRequest(f"r{i}", i * 0.02, 100 + (i * 37) % 1500, 20 + (i * 53) % 400) for i in range(n)]


def test_backlog_rule_is_tokens_converted_from_seconds_on_the_timing_model(h100):
    sim = ClusterSim(system_config("tetri+pd_ratio=1:3"), h100, 4, _reqs())
    tps = sim.chunk / h100.prefill_s(sim.chunk)
    assert sim.backlog_tokens == math.ceil(0.03 * tps) - 1  # 30 ms of prefill work at the knee
    assert sim.run().config["colocate_backlog_tokens"] == sim.backlog_tokens
    hphd = system_config("tetri+fallback=hphd")
    assert hphd.policy.colocate_heavy_heavy and hphd.backlog_wait_s is None and hphd.policy.colocate_backlog_tokens == 0
    backlog = system_config("disagg-simple+fallback=backlog")
    assert not backlog.policy.colocate_heavy_heavy and backlog.backlog_wait_s == 0.1
    # The deployed threshold is tokens already: used as it is.
    deployed = deployed_system(PolicyConfig(colocate_backlog_tokens=777), pd_ratio="1:3")
    assert ClusterSim(deployed, h100, 4, _reqs()).backlog_tokens == 777


def test_the_planner_simulates_the_deployed_settings(h100):
    settings = Settings(database_url="sqlite://", prefill_policy="ljf", decode_admission="greedy", late_binding="none")
    cfg = deployed_system(settings.policy_config(), plan_min_requests=200, plan_max_requests=200)
    sim = ClusterSim(cfg, h100, 4, _reqs())
    assert sim.placement.core.admission.name == "greedy" and sim.pol.new_queue().policy == "ljf"
    reqs = _reqs()
    choice = recommend_split(4, [r.prompt_tokens for r in reqs], [r.output_tokens for r in reqs], 50.0, h100, cfg)
    assert choice.prefill + choice.decode == 4 and choice.candidates


@pytest.fixture(scope="module")
def h100():
    from backends.engines.simulated.profiles import get_timing

    return get_timing("h100-llama-2-7b")
