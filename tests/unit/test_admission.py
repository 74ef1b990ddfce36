"""Decode admission (orchestrator/policies/admission.py): hypothesis properties plus worked examples.

The properties are stated independently of the implementation (an oracle or an invariant computed
here), so each one fails when the behaviour it names breaks.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.policies.admission import make_admission
from orchestrator.policies.capacity import available_kv, fits
from orchestrator.policies.types import InstanceView, RequestView
from tests.policy_helpers import FAST, inst, instance_views, req, requests


# ---------------------------------------------------------------------------------------------------
# decode admission
# ---------------------------------------------------------------------------------------------------
def _working_set_at_horizon(i: InstanceView, r: RequestView) -> int | None:
    """Independent model: every running decode grows one token per step for its predicted remaining
    steps (unknown ones: forever); the new one grows up to its predicted lower end. KV needed from
    now until the shortest predicted one finishes (None when there is nothing to look ahead to)."""
    rem = list(i.decode_remaining)
    if not rem:
        return None
    horizon = max(1, min(rem))
    n = max(i.running, len(rem))
    growth = 0
    for t in range(1, horizon + 1):  # step-by-step, not the closed form
        growth = sum(min(x, t) if x >= 1 else t for x in rem) + (n - len(rem)) * t
    return r.prompt_tokens + min(r.predicted_output_lo, horizon) + growth


@FAST
@given(st.sampled_from(["reserve_static", "reserve_dynamic"]), instance_views(role="decode"), requests())
def test_reserve_policies_never_admit_beyond_capacity(name, i, r):
    if make_admission(name).admits(i, r):
        # The predicted working set (prompt + lower end of the bucket) fits in what is left.
        assert r.kv_need <= i.free_kv_tokens - i.reserved_kv_tokens
        assert r.kv_need <= i.total_kv_tokens
        if name == "reserve_dynamic":
            ahead = _working_set_at_horizon(i, r)
            assert ahead is None or ahead <= available_kv(i)


@FAST
@given(instance_views(role="decode"), requests())
def test_admission_policies_are_ordered_by_strictness(i, r):
    greedy, static, dynamic = (make_admission(n).admits(i, r) for n in ("greedy", "reserve_static", "reserve_dynamic"))
    assert not dynamic or static  # dynamic is never looser than static
    assert not static or fits(i, r)
    assert static == fits(i, r)  # and static is exactly the dispatcher's α test
    assert greedy == (available_kv(i) >= r.prompt_tokens + 1)


@FAST
@given(instance_views(role="decode"), requests())
def test_reserve_dynamic_equals_static_with_nothing_to_look_ahead(i, r):
    i = replace(i, decode_remaining=())
    assert make_admission("reserve_dynamic").admits(i, r) == make_admission("reserve_static").admits(i, r)


def test_reserve_dynamic_example():
    adm = make_admission("reserve_dynamic")
    r = req(prompt=100, bucket=1)  # kv_need 300
    # Two running decodes with 50 and 300 tokens to go: horizon 50; need 100 + 50 + 2*50 = 250.
    i = inst(free=400, running=2, decode_remaining=(50, 300))
    assert adm.admits(i, r)
    i = inst(free=400, running=4, decode_remaining=(50, 300, 80, 90))  # 100 + 50 + 4*50 = 350
    assert adm.admits(i, r)
    i = inst(free=400, running=5, decode_remaining=(60, 300, 80, 90, 70))  # 100 + 60 + 5*60 = 460
    assert not adm.admits(i, r)
    assert make_admission("reserve_static").admits(i, r)
    # A decode past its prediction (0 to go) counts as finishing after one more step.
    assert adm.admits(inst(free=300, running=1, decode_remaining=(0,)), r)
    # Running decodes without a reported prediction grow for the whole horizon too.
    assert not adm.admits(inst(free=400, running=6, decode_remaining=(50,)), r)  # 100 + 50 + 6*50
    assert adm.admits(inst(free=400, running=3, decode_remaining=(50,)), r)  # 100 + 50 + 3*50


def test_greedy_admits_prompt_only():
    adm = make_admission("greedy")
    r = req(prompt=100, bucket=5)
    assert adm.admits(inst(free=101), r)
    assert not adm.admits(inst(free=100), r)
    assert not adm.admits(inst(free=300, reserved_kv_tokens=200), r)
