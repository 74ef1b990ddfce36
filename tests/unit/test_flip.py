"""Role flips (orchestrator/policies/flip.py): hypothesis properties plus worked examples.

The properties are stated independently of the implementation (an oracle or an invariant computed
here), so each one fails when the behaviour it names breaks.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.policies.flip import make_flip_policy
from tests.policy_helpers import FAST, inst


# ---------------------------------------------------------------------------------------------------
# flip
# ---------------------------------------------------------------------------------------------------
def test_flip_none_never_flips():
    views = [inst("p0", role="prefill"), inst("p1", role="prefill"), inst("d0", queued=5)]
    f = make_flip_policy("none")
    assert all(f.decide(views, t) == [] for t in range(0, 1000, 100))


def test_idle_prefill_flips_to_decode_when_decode_is_loaded():
    f = make_flip_policy("idle", idle_s=60, min_per_role=1)
    views = [inst("p0", role="prefill"), inst("p1", role="prefill", running=1, running_prompt_tokens=50),
             inst("d0", queued=3)]  # fmt: skip
    assert f.decide(views, 0) == []
    assert f.decide(views, 59.9) == []
    [d] = f.decide(views, 60)
    assert (d.instance_id, d.to_role) == ("p0", "decode") and "idle" in d.reason
    assert f.decide(views, 61) == []  # pending: p1 is the last prefill instance


def test_min_per_role_keeps_the_last_instances():
    views = [inst("p0", role="prefill"), inst("p1", role="prefill"), inst("d0", queued=3)]
    f = make_flip_policy("idle", idle_s=10, min_per_role=1)
    assert f.decide(views, 0) == []
    [d] = f.decide(views, 10)
    assert d.instance_id == "p0"
    # p0 drains (not accepting), then shows up as a decode instance: p1 is the last prefill one.
    draining = [replace(views[0], accepting=False), views[1], views[2]]
    assert f.decide(draining, 11) == [] and f.decide(draining, 100) == []
    flipped = [inst("p0", role="decode"), views[1], views[2]]
    assert all(f.decide(flipped, t) == [] for t in (101, 200, 1000))
    g = make_flip_policy("idle", idle_s=10, min_per_role=2)
    assert all(g.decide(views, t) == [] for t in (0, 10, 1000))


def test_no_flip_when_other_role_not_loaded_or_instance_busy():
    f = make_flip_policy("idle", idle_s=10, min_per_role=1, load_kv_threshold=0.8)
    views = [inst("p0", role="prefill"), inst("p1", role="prefill"), inst("d0", free=5000)]
    assert f.decide(views, 0) == [] and f.decide(views, 100) == []
    views[2] = inst("d0", free=1000)  # 90% KV used: loaded
    [d] = f.decide(views, 101)
    assert d.instance_id == "p0"
    # Busy at any observation resets the idle clock.
    g = make_flip_policy("idle", idle_s=10, min_per_role=1)
    busy = [inst("p0", role="prefill", queued=1, queued_prompt_tokens=10), inst("p1", role="prefill", running=1),
            inst("d0", queued=1)]  # fmt: skip
    assert g.decide(busy, 0) == []
    idle = [inst("p0", role="prefill"), busy[1], busy[2]]
    assert g.decide(idle, 5) == [] and g.decide(busy, 12) == [] and g.decide(idle, 13) == []
    assert g.decide(idle, 22.9) == [] and g.decide(idle, 23)[0].instance_id == "p0"


def test_decode_flips_to_prefill_and_cooldown_blocks_flapping():
    f = make_flip_policy("idle", idle_s=10, min_per_role=1, cooldown_s=100)
    views = [inst("p0", role="prefill", queued=4, queued_prompt_tokens=4000), inst("d0"), inst("d1", running=2)]
    [d] = f.decide(views, 0) or f.decide(views, 10)
    assert (d.instance_id, d.to_role) == ("d0", "prefill")
    # It became a prefill instance; now decode is loaded and it is idle again right away.
    views = [inst("p0", role="prefill", running=1), inst("d0", role="prefill"), inst("d1", queued=2)]
    assert f.decide(views, 11) == [] and f.decide(views, 50) == [] and f.decide(views, 109) == []
    [d] = f.decide(views, 110)  # idle since 11; its cooldown is over at 110
    assert d.instance_id == "d0" and d.to_role == "decode"


def test_pool_scope_needs_the_whole_pool_idle():
    f = make_flip_policy("idle", idle_s=5, min_per_role=1, scope="pool")
    views = [inst("p0", role="prefill"), inst("p1", role="prefill", running=1), inst("d0", queued=1)]
    assert f.decide(views, 0) == [] and f.decide(views, 100) == []
    views[1] = inst("p1", role="prefill")
    assert f.decide(views, 101) == []
    assert f.decide(views, 106)[0].instance_id == "p0"


flip_steps = st.lists(
    st.tuples(
        st.floats(0.5, 40, allow_nan=False),  # time step
        st.lists(st.sampled_from(["idle", "busy", "queued", "kvfull"]), min_size=6, max_size=6),  # load per inst
        st.floats(0, 30, allow_nan=False),  # drain time of a flip decided now
    ),
    max_size=60,
)


@FAST
@given(st.integers(1, 6), st.integers(0, 3), st.floats(1, 60), st.none() | st.floats(0, 120), flip_steps,
       st.sampled_from(["instance", "pool"]))  # fmt: skip
def test_flip_respects_min_per_role_cooldown_and_idleness(n_prefill, min_per_role, idle_s, cooldown_s, steps, scope):
    """A cluster model: a decided flip drains the instance (not accepting) for a while, then it
    comes back in its new role."""
    n = 6
    roles = ["prefill" if k < n_prefill else "decode" for k in range(n)]
    draining_until: dict[int, float] = {}
    to_role: dict[int, str] = {}
    f = make_flip_policy("idle", idle_s=idle_s, min_per_role=min_per_role, cooldown_s=cooldown_s, scope=scope)
    cooldown = idle_s if cooldown_s is None else cooldown_s
    initial = {r: roles.count(r) for r in ("prefill", "decode")}
    idle_since: dict[int, float] = {}
    last_flip: dict[int, float] = {}
    now = 0.0
    for dt, loads, drain in steps:
        now += dt
        for k in [k for k, t in draining_until.items() if t <= now]:
            roles[k] = to_role.pop(k)
            del draining_until[k]
            idle_since.pop(k, None)
        views = []
        for k in range(n):
            load = loads[k]
            v = inst(f"i{k}", role=roles[k], total=1000, accepting=k not in draining_until,
                     running=1 if load == "busy" else 0, queued=1 if load == "queued" else 0,
                     free=100 if load == "kvfull" else 1000)  # fmt: skip
            views.append(v)
            if load in ("idle", "kvfull") and k not in draining_until:
                idle_since.setdefault(k, now)
            else:
                idle_since.pop(k, None)
        decisions = f.decide(views, now)
        assert len(decisions) <= 1
        for dec in decisions:
            k = int(dec.instance_id[1:])
            assert k not in draining_until and dec.to_role != roles[k]
            assert k in idle_since and now - idle_since[k] >= idle_s - 1e-9
            assert k not in last_flip or now - last_flip[k] >= cooldown - 1e-9
            staying = sum(1 for j in range(n) if roles[j] == roles[k] and j not in draining_until)
            assert staying - 1 >= min_per_role
            last_flip[k] = now
            draining_until[k] = now + drain
            to_role[k] = dec.to_role
        for role in ("prefill", "decode"):
            serving = sum(1 for j in range(n) if roles[j] == role and j not in draining_until)
            assert serving >= min(min_per_role, initial[role])
