"""Scheduling policies (orchestrator/policies): the registered names, capacity, the global scheduler and
the predictors (the prefill queue, dispatch, decode admission and flips have their own files): hypothesis
properties plus worked examples.

The properties are stated independently of the implementation (an oracle or an invariant computed
here), so each one fails when the behaviour it names breaks.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.config import Settings
from orchestrator.policies import EXTRA_POLICY_NAMES, POLICY_NAMES
from orchestrator.policies.admission import make_admission
from orchestrator.policies.capacity import available_kv, fits
from orchestrator.policies.dispatch import make_dispatcher
from orchestrator.policies.flip import make_flip_policy
from orchestrator.policies.global_scheduler import LeastLoadedPrefill, make_global_scheduler
from orchestrator.policies.predictors import (
    ConstantPredictor,
    MissingOutputLength,
    OraclePredictor,
    make_predictor,
)
from orchestrator.policies.prefill_queue import PrefillQueue, make_prefill_queue
from orchestrator.policies.types import InstanceView
from tests.policy_helpers import FAST, inst, instance_views, req, requests


# ---------------------------------------------------------------------------------------------------
# configuration names
# ---------------------------------------------------------------------------------------------------
def test_settings_accept_exactly_the_registered_policy_names():
    from pydantic import ValidationError

    from orchestrator.policies import registry
    from orchestrator.policies.config import POLICY_KNOBS

    for knob, names in POLICY_NAMES.items():
        assert registry.names(POLICY_KNOBS[knob]) == names, knob
    for knob, reg in POLICY_KNOBS.items():
        for name in registry.names(reg):
            assert getattr(Settings(database_url="sqlite://", **{knob: name}), knob) == name
        with pytest.raises(ValidationError, match="unknown"):
            Settings(database_url="sqlite://", **{knob: "nope"})
    assert "least_loaded" in EXTRA_POLICY_NAMES["global_scheduler"]


def test_factories_build_every_name_and_reject_unknown():
    for name in POLICY_NAMES["prefill_policy"]:
        assert isinstance(make_prefill_queue(name, sched_batch=4), PrefillQueue)
    for name in POLICY_NAMES["dispatch_policy"]:
        assert make_dispatcher(name).name == name
    for name in POLICY_NAMES["decode_admission"]:
        assert make_admission(name).name == name
    for name in POLICY_NAMES["flip_policy"]:
        assert make_flip_policy(name).name == name
    assert isinstance(make_global_scheduler("least_loaded"), LeastLoadedPrefill)
    assert make_dispatcher("power_of_two").objective == "balance"  # type: ignore[attr-defined]
    for factory in (make_prefill_queue, make_dispatcher, make_admission, make_flip_policy,
                    make_global_scheduler, make_predictor):  # fmt: skip
        with pytest.raises(ValueError, match="unknown"):
            factory("nope")
    with pytest.raises(ValueError):
        make_prefill_queue("sjf", sched_batch=0)
    with pytest.raises(ValueError):
        make_dispatcher("power_of_two", power_of_d=0)
    with pytest.raises(ValueError):
        make_dispatcher("random", fallback="wherever")


# ---------------------------------------------------------------------------------------------------
# capacity
# ---------------------------------------------------------------------------------------------------
@FAST
@given(instance_views(), requests())
def test_fits_is_free_minus_reserved_versus_prompt_plus_predicted_lo(i, r):
    lo = 0 if r.predicted_bucket is None else min(r.predicted_bucket * r.granularity, r.max_tokens)
    assert fits(i, r) == (i.free_kv_tokens - i.reserved_kv_tokens >= r.prompt_tokens + lo)


def test_fits_examples():
    r = req(prompt=100, bucket=1)  # kv_need 300
    assert fits(inst(free=300), r)
    assert not fits(inst(free=299), r)
    assert not fits(inst(free=400, reserved_kv_tokens=101), r)
    assert available_kv(inst(free=10, reserved_kv_tokens=50)) == 0


# ---------------------------------------------------------------------------------------------------
# global scheduler
# ---------------------------------------------------------------------------------------------------
@st.composite
def prefill_fleets(draw, max_size: int = 8) -> list[InstanceView]:
    n = draw(st.integers(0, max_size))
    out = []
    for k in range(n):
        role, queued, running_tokens, running, usable = draw(
            st.tuples(st.sampled_from(["prefill", "prefill", "decode", "colocated"]), st.integers(0, 40),
                      st.integers(0, 40), st.integers(0, 3), st.sampled_from([True, True, True, False])))  # fmt: skip
        out.append(inst(f"p{k:02d}", role=role, queued_prompt_tokens=queued, running_prompt_tokens=running_tokens,
                        running=running, healthy=usable))  # fmt: skip
    return out


@FAST
@given(prefill_fleets(), requests())
def test_least_loaded_picks_a_minimum_prefill_instance(views, r):
    picked = LeastLoadedPrefill().pick(views, r)
    usable = [v for v in views if v.usable]
    pool = [v for v in usable if v.role == "prefill"] or [v for v in usable if v.role == "colocated"]
    if not pool:
        assert picked is None
        return
    chosen = next(v for v in views if v.id == picked)
    assert chosen in pool
    assert chosen.prefill_load == min(v.prefill_load for v in pool)
    ties = [v for v in pool if v.prefill_load == chosen.prefill_load]
    assert chosen.running == min(v.running for v in ties)


def test_least_loaded_examples():
    g = make_global_scheduler("least_loaded")
    r = req()
    views = [
        inst("p2", role="prefill", queued_prompt_tokens=10),
        inst("p1", role="prefill", running_prompt_tokens=10, running=1),
        inst("p0", role="prefill", queued_prompt_tokens=5, running_prompt_tokens=5, running=0),
        inst("d0", role="decode"),  # idle, but never a prefill target
        inst("p3", role="prefill", healthy=False),
    ]
    assert g.pick(views, r) == "p0"  # all load 10: fewest running (p0, p2), then id
    assert g.pick([views[3], inst("c1", role="colocated", queued_prompt_tokens=3), inst("c0", role="colocated",
                  queued_prompt_tokens=4)], r) == "c1"  # fmt: skip
    assert g.pick([views[3], views[4]], r) is None
    assert g.pick([], r) is None


# ---------------------------------------------------------------------------------------------------
# predictors
# ---------------------------------------------------------------------------------------------------
def test_oracle_and_constant_predictors():
    oracle = make_predictor("oracle", 200)
    assert isinstance(oracle, OraclePredictor)
    assert oracle.predict_bucket("hi", 3, {"output_len": 0}) == 0
    assert oracle.predict_bucket("hi", 3, {"output_len": 199}) == 0
    assert oracle.predict_bucket("hi", None, {"output_len": 200}) == 1
    assert make_predictor("oracle", 100).predict_bucket("hi", None, {"output_len": 450}) == 4
    with pytest.raises(MissingOutputLength, match="output_len"):
        oracle.predict_bucket("hi", 3, {})
    with pytest.raises(KeyError):
        oracle.predict_bucket("hi")
    const = make_predictor("constant", 200)
    assert isinstance(const, ConstantPredictor)
    assert const.predict_bucket("anything") == 0
    assert ConstantPredictor(bucket=3).predict_bucket("x", 5, None) == 3


def test_learned_predictor_defers_to_the_predictor_package(monkeypatch):
    import sys
    import types

    calls: list[tuple] = []
    fake = types.ModuleType("predictor")

    def load_predictor(name, granularity, **kw):
        calls.append((name, granularity))
        return ConstantPredictor(bucket=7)

    fake.load_predictor = load_predictor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "predictor", fake)
    p = make_predictor("learned", 400)
    assert calls == [("learned", 400)] and p.predict_bucket("x") == 7
