"""Decode dispatch (orchestrator/policies/dispatch.py): hypothesis properties plus worked examples.

The properties are stated independently of the implementation (an oracle or an invariant computed
here), so each one fails when the behaviour it names breaks.
"""

from __future__ import annotations

import random
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.policies.capacity import available_kv, fits
from orchestrator.policies.dispatch import DISPATCH_POLICY_NAMES, make_dispatcher, split_alpha_beta
from orchestrator.policies.types import InstanceView
from tests.policy_helpers import FAST, SpyRandom, decode_fleets, inst, req, requests


# ---------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------
@FAST
@given(st.sampled_from(DISPATCH_POLICY_NAMES), st.sampled_from(["most_free", "none"]), st.integers(1, 4),
       decode_fleets(), requests(), st.integers(0, 2**32))  # fmt: skip
def test_dispatcher_never_picks_beta_while_alpha_is_non_empty(name, fallback, d, views, r, seed):
    disp = make_dispatcher(name, power_of_d=d, fallback=fallback)
    picked = disp.pick(views, r, random.Random(seed))
    alpha = [v for v in views if v.usable and fits(v, r)]
    usable = [v for v in views if v.usable]
    if alpha:
        assert picked in {v.id for v in alpha}
    elif usable and fallback == "most_free":
        chosen = next(v for v in usable if v.id == picked)
        assert available_kv(chosen) == max(available_kv(v) for v in usable)
    else:
        assert picked is None


@FAST
@given(st.integers(1, 4), decode_fleets(min_size=1), requests(), st.integers(0, 2**32),
       st.sampled_from([None, 0, 128, 400]), st.sampled_from(["after", "balance", "delta"]))  # fmt: skip
def test_power_of_two_keeps_the_lowest_ratio_candidate(d, views, r, seed, threshold, objective):
    if not split_alpha_beta(views, r)[0]:  # make sure α is not empty
        views[0] = replace(
            views[0], healthy=True, accepting=True, free_kv_tokens=r.kv_need + views[0].reserved_kv_tokens
        )
    alpha, _ = split_alpha_beta(views, r)
    rng = SpyRandom(seed)
    disp = make_dispatcher("power_of_two", power_of_d=d, heavy_decode_threshold=threshold, ratio_objective=objective)
    picked = disp.pick(views, r, rng)
    assert len(rng.samples) == 1 and len(rng.samples[0]) == min(d, len(alpha))
    candidates = rng.samples[0]
    assert {v.id for v in candidates} <= {v.id for v in alpha}
    heavy = r.heavy_decode if threshold is None else r.predicted_output_lo > threshold

    def ratio(v: InstanceView) -> Fraction:
        """ "after": the candidate's smoothed ratio once the request is added; "balance": that ratio
        for a heavy request and its negation for a light one (light goes where heavy dominates);
        "delta": how much adding it raises that ratio (i.e. the cluster's average ratio)."""
        h = v.heavy_decodes + heavy
        light = v.light_decodes + (not heavy)
        after = Fraction(h + 1, light + 1)
        if objective == "after":
            return after
        if objective == "balance":
            return after if heavy else -after
        return after - Fraction(v.heavy_decodes + 1, v.light_decodes + 1)

    chosen = next(v for v in candidates if v.id == picked)
    best = min(ratio(v) for v in candidates)
    assert ratio(chosen) == best
    assert available_kv(chosen) == max(available_kv(v) for v in candidates if ratio(v) == best)
    if len(alpha) >= 2 and d >= len(alpha):  # every instance of α is a candidate: a global minimum
        assert ratio(chosen) == min(ratio(v) for v in alpha)


def test_power_of_two_spreads_heavy_decodes():
    disp = make_dispatcher("power_of_two", power_of_d=2, ratio_objective="after")
    views = [inst("a", heavy_decodes=3, light_decodes=1), inst("b", heavy_decodes=0, light_decodes=4)]
    heavy = req(bucket=2)  # lower end 400 > 128
    light = req(bucket=0)
    assert disp.pick(views, heavy, random.Random(0)) == "b"  # (0+1+1)/(4+1) < (3+1+1)/(1+1)
    assert disp.pick(views, light, random.Random(0)) == "b"
    # Equal ratios: more available KV wins.
    views = [inst("a", free=500), inst("b", free=900)]
    assert disp.pick(views, light, random.Random(0)) == "b"


def test_power_of_two_objectives_on_light_and_heavy_decodes():
    views = [inst("busy", light_decodes=10, running=10), inst("empty")]
    light, heavy = req(bucket=0), req(bucket=2)
    after = make_dispatcher("power_of_two", ratio_objective="after")
    balance = make_dispatcher("power_of_two", ratio_objective="balance")
    delta = make_dispatcher("power_of_two", ratio_objective="delta")
    # "after" piles a light decode onto the instance with more light ones: 1/12 < 1/2 ...
    assert after.pick(views, light, random.Random(0)) == "busy"
    # ... "balance" sends it where the ratio is highest (1/2 > 1/12), "delta" where adding it
    # lowers the average ratio most (1 -> 1/2).
    assert balance.pick(views, light, random.Random(0)) == "empty"
    assert delta.pick(views, light, random.Random(0)) == "empty"
    # A light decode dilutes the heavy-dominated instance; a heavy one goes to the light-dominated one.
    views = [
        inst("h", heavy_decodes=4, light_decodes=1, running=5),
        inst("l", heavy_decodes=1, light_decodes=4, running=5),
    ]
    for disp in (balance, delta):
        assert disp.pick(views, light, random.Random(0)) == "h"
        assert disp.pick(views, heavy, random.Random(0)) == "l"
    assert after.pick(views, heavy, random.Random(0)) == "l"
    # "delta" ignores the heavy count for a heavy request (its rise is 1/(light+1)) ...
    views = [inst("many_heavy", heavy_decodes=6, light_decodes=3, running=9), inst("few", light_decodes=2, running=2)]
    assert delta.pick(views, heavy, random.Random(0)) == "many_heavy"
    # ... which "after" and "balance" do not: (6+2)/(3+1) > (0+2)/(2+1).
    assert after.pick(views, heavy, random.Random(0)) == "few"
    assert balance.pick(views, heavy, random.Random(0)) == "few"
    with pytest.raises(ValueError):
        make_dispatcher("power_of_two", ratio_objective="median")


def test_power_of_d_samples_from_alpha_only():
    disp = make_dispatcher("power_of_two", power_of_d=2)
    r = req(prompt=100, bucket=0)
    views = [inst(f"d{k}", free=50 if k % 2 else 5000) for k in range(10)]  # odd ids are in β
    picks = {disp.pick(views, r, random.Random(seed)) for seed in range(200)}
    assert picks == {f"d{k}" for k in range(0, 10, 2)}


def test_beta_fallback_is_explicit():
    r = req(prompt=1000, bucket=1)  # kv_need 1200
    views = [inst("a", free=800), inst("b", free=1100, reserved_kv_tokens=200), inst("c", free=1000)]
    rng = random.Random(0)
    for name in DISPATCH_POLICY_NAMES:
        assert make_dispatcher(name).pick(views, r, rng) == "c"  # most available KV in β
        assert make_dispatcher(name, fallback="none").pick(views, r, rng) is None
        assert make_dispatcher(name).pick([], r, rng) is None
        assert make_dispatcher(name).pick([inst("x", healthy=False)], r, rng) is None


def test_round_robin_cycles_over_alpha_by_id():
    disp = make_dispatcher("round_robin")
    r = req()
    views = [inst("c"), inst("a"), inst("b")]
    rng = random.Random(0)
    assert [disp.pick(views, r, rng) for _ in range(4)] == ["a", "b", "c", "a"]
    views[1] = inst("a", free=0)  # a drops out of α: the cursor moves on
    assert [disp.pick(views, r, rng) for _ in range(3)] == ["b", "c", "b"]


def test_least_loaded_and_imbalanced_dispatch():
    r = req()
    views = [inst("b", free=900), inst("a", free=500), inst("c", free=950, reserved_kv_tokens=100)]
    rng = random.Random(0)
    assert make_dispatcher("least_loaded").pick(views, r, rng) == "b"
    assert make_dispatcher("imbalanced").pick(views, r, rng) == "a"
    views[1] = inst("a", free=10)  # full: imbalanced moves to the next id
    assert make_dispatcher("imbalanced").pick(views, r, rng) == "b"


def test_random_dispatch_is_reproducible_and_covers_alpha():
    disp = make_dispatcher("random")
    views = [inst(f"d{k}") for k in range(4)]
    r = req()
    assert [disp.pick(views, r, random.Random(3)) for _ in range(3)] == [disp.pick(views, r, random.Random(3))] * 3
    assert {disp.pick(views, r, random.Random(s)) for s in range(100)} == {v.id for v in views}
