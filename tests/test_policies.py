"""Scheduling policies (orchestrator/policies): hypothesis properties plus worked examples.

The properties are stated independently of the implementation (an oracle or an invariant computed
here), so each one fails when the behaviour it names breaks.
"""

from __future__ import annotations

import random
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import Settings
from orchestrator.policies import EXTRA_POLICY_NAMES, POLICY_NAMES
from orchestrator.policies.admission import make_admission
from orchestrator.policies.capacity import available_kv, fits
from orchestrator.policies.dispatch import DISPATCH_POLICY_NAMES, make_dispatcher, split_alpha_beta
from orchestrator.policies.flip import make_flip_policy
from orchestrator.policies.global_scheduler import LeastLoadedPrefill, make_global_scheduler
from orchestrator.policies.predictors import (
    ConstantPredictor,
    MissingOutputLength,
    OraclePredictor,
    make_predictor,
)
from orchestrator.policies.prefill_queue import PrefillQueue, make_prefill_queue
from orchestrator.policies.types import InstanceView, RequestView

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------
# helpers and strategies
# ---------------------------------------------------------------------------------------------------
def inst(id: str = "i0", role: str = "decode", total: int = 10_000, free: int | None = None, **kw) -> InstanceView:
    return InstanceView(id=id, role=role, total_kv_tokens=total, free_kv_tokens=total if free is None else free, **kw)  # type: ignore[arg-type]


def req(id: str = "r", prompt: int = 100, bucket: int | None = None, arrival: float = 0.0, max_tokens: int = 4096,
        granularity: int = 200) -> RequestView:  # fmt: skip
    return RequestView(id=id, arrival=arrival, prompt_tokens=prompt, max_tokens=max_tokens,
                       predicted_bucket=bucket, granularity=granularity)  # fmt: skip


@st.composite
def requests(draw, id: str = "r") -> RequestView:
    return RequestView(
        id=id,
        arrival=draw(st.floats(0, 1000, allow_nan=False)),
        prompt_tokens=draw(st.integers(0, 3000)),
        max_tokens=draw(st.integers(1, 4000)),
        predicted_bucket=draw(st.none() | st.integers(0, 12)),
        granularity=draw(st.sampled_from([100, 200, 400])),
        heavy_decode_threshold=draw(st.sampled_from([0, 128, 512])),
    )


@st.composite
def instance_views(draw, id: str = "i0", role: str | None = None) -> InstanceView:
    total = draw(st.integers(0, 8000))
    free = draw(st.integers(0, total))
    running = draw(st.integers(0, 12))
    heavy = draw(st.integers(0, running))
    n_pred = draw(st.integers(0, running))
    remaining = tuple(draw(st.lists(st.integers(0, 2000), min_size=n_pred, max_size=n_pred)))
    return InstanceView(
        id=id,
        role=role or draw(st.sampled_from(["prefill", "decode", "colocated"])),
        total_kv_tokens=total,
        free_kv_tokens=free,
        healthy=draw(st.booleans()) or draw(st.booleans()),
        accepting=draw(st.booleans()) or draw(st.booleans()),
        queued_prompt_tokens=draw(st.integers(0, 5000)),
        running_prompt_tokens=draw(st.integers(0, 5000)),
        running=running,
        queued=draw(st.integers(0, 5)),
        heavy_decodes=heavy,
        light_decodes=running - heavy,
        decode_remaining=remaining,
        reserved_kv_tokens=draw(st.integers(0, 3000)),
    )


@st.composite
def fleets(draw, role: str | None = None, min_size: int = 0, max_size: int = 8) -> list[InstanceView]:
    n = draw(st.integers(min_size, max_size))
    return [draw(instance_views(id=f"i{k:02d}", role=role)) for k in range(n)]


@st.composite
def decode_fleets(draw, min_size: int = 0, max_size: int = 8) -> list[InstanceView]:
    """Decode instances, lighter to draw than ``fleets`` (the dispatcher ignores the rest)."""
    n = draw(st.integers(min_size, max_size))
    out = []
    for k in range(n):
        free, reserved, heavy, light, flags = draw(
            st.tuples(
                st.integers(0, 6000),
                st.integers(0, 1500),
                st.integers(0, 6),
                st.integers(0, 6),
                st.sampled_from([(True, True)] * 5 + [(False, True), (True, False)]),
            )  # fmt: skip
        )
        out.append(inst(f"d{k:02d}", total=6000, free=free, reserved_kv_tokens=reserved, heavy_decodes=heavy,
                        light_decodes=light, running=heavy + light, healthy=flags[0], accepting=flags[1]))  # fmt: skip
    return out


class SpyRandom(random.Random):
    """A seeded Random that remembers what ``sample`` returned (the power-of-d candidates)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.samples: list[list] = []

    def sample(self, population, k, **kw):  # type: ignore[override]
        out = super().sample(population, k, **kw)
        self.samples.append(list(out))
        return out


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
# prefill queue
# ---------------------------------------------------------------------------------------------------
def _drain(q: PrefillQueue, now: float = 0.0) -> list[str]:
    return [r.id for r in q.pop_ready(now, 0, len(q) + 1)]


def test_paper_example_twenty_queued_batch_ten_gives_two_sorted_batches():
    rng = random.Random(7)
    prompts = [rng.randrange(1, 2000) for _ in range(20)]
    for policy, sign in (("sjf", 1), ("ljf", -1)):
        q = make_prefill_queue(policy, sched_batch=10)
        for k, p in enumerate(prompts):
            q.push(req(f"r{k}", prompt=p, arrival=k), now=k)
        out = _drain(q)
        first, second = out[:10], out[10:]
        assert set(first) == {f"r{k}" for k in range(10)}
        assert set(second) == {f"r{k}" for k in range(10, 20)}
        for batch in (first, second):
            lens = [sign * prompts[int(x[1:])] for x in batch]
            assert lens == sorted(lens)


def test_sjf_ties_keep_arrival_order_and_fcfs_ignores_length():
    q = make_prefill_queue("sjf", sched_batch=8)
    for k, p in enumerate([5, 1, 5, 1]):
        q.push(req(f"r{k}", prompt=p, arrival=k), now=0)
    assert _drain(q) == ["r1", "r3", "r0", "r2"]
    q = make_prefill_queue("fcfs", sched_batch=2)
    for k, p in enumerate([5, 1, 5, 1]):
        q.push(req(f"r{k}", prompt=p, arrival=k), now=0)
    assert _drain(q) == ["r0", "r1", "r2", "r3"]


def test_batch_is_released_fully_before_the_next_is_formed():
    q = make_prefill_queue("sjf", sched_batch=3)
    for k, p in enumerate([30, 20, 10]):
        q.push(req(f"a{k}", prompt=p, arrival=k), now=0)
    assert [r.id for r in q.pop_ready(0, 1, 2)] == ["a2"]  # batch {a0, a1, a2} formed, one released
    q.push(req("tiny", prompt=1, arrival=5), now=5)  # shorter than everything, but arrives late
    assert _drain(q, 6) == ["a1", "a0", "tiny"]


def test_pop_ready_respects_backlog_and_tracks_waits():
    q = make_prefill_queue("fcfs", sched_batch=16)
    for k in range(5):
        q.push(req(f"r{k}", arrival=k), now=float(k))
    assert q.pop_ready(10.0, engine_backlog=2, max_backlog=2) == []
    assert q.pop_ready(10.0, engine_backlog=5, max_backlog=2) == []
    got = q.pop_ready(10.0, engine_backlog=0, max_backlog=2)
    assert [r.id for r in got] == ["r0", "r1"]
    assert q.last_waits == {"r0": 10.0, "r1": 9.0}
    assert q.released == 2 and q.max_wait_s == 10.0 and q.mean_wait_s == 9.5
    assert len(q) == 3 and "r2" in q and "r0" not in q


def test_remove_from_batch_and_raw_queue():
    q = make_prefill_queue("ljf", sched_batch=2)
    for k, p in enumerate([1, 2, 3, 4]):
        q.push(req(f"r{k}", prompt=p, arrival=k), now=0)
    assert [r.id for r in q.pop_ready(0, 0, 1)] == ["r1"]  # batch {r0, r1}
    assert q.remove("r0").id == "r0"  # from the current batch
    assert q.remove("r3").id == "r3"  # from the raw queue
    assert q.remove("r3") is None and q.remove("nope") is None
    assert [r.id for r in q.items()] == ["r2"]
    assert q.queued_prompt_tokens == 3
    assert _drain(q) == ["r2"] and len(q) == 0
    with pytest.raises(ValueError):
        q.push(req("x"), 0)
        q.push(req("x"), 0)


def test_replaced_request_keeps_its_place_by_arrival():
    q = make_prefill_queue("fcfs", sched_batch=16)
    q.push(req("new", arrival=10.0), now=10.0)
    q.push(req("old", arrival=1.0), now=11.0)  # re-placed from a failed instance
    assert _drain(q, 12) == ["old", "new"]


# An operation script: pushes (prompt length) interleaved with pop_ready(engine_backlog, max_backlog).
ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 4000)),
        st.tuples(st.just("pop"), st.integers(0, 6), st.integers(0, 8)),
    ),
    max_size=120,
)


def _run_script(policy: str, batch: int, script) -> tuple[list[str], list[str], PrefillQueue]:
    """Run the script with arrivals in push order; finish with a full drain. (pushed, released)."""
    q = make_prefill_queue(policy, sched_batch=batch)
    pushed: list[str] = []
    released: list[str] = []
    t = 0.0
    for op in script:
        t += 1.0
        if op[0] == "push":
            rid = f"r{len(pushed)}"
            q.push(req(rid, prompt=op[1], arrival=t), now=t)
            pushed.append(rid)
        else:
            _, backlog, max_backlog = op
            before = len(q)
            got = q.pop_ready(t, backlog, max_backlog)
            room = max(0, max_backlog - backlog)
            assert len(got) <= room  # never exceeds max_backlog
            assert len(got) == min(room, before)  # and is work-conserving
            released += [r.id for r in got]
    released += _drain(q, t + 1)
    return pushed, released, q


@FAST
@given(st.sampled_from(["fcfs", "sjf", "ljf"]), st.integers(1, 20), ops)
def test_no_request_overtaken_by_more_than_its_batch(policy, batch, script):
    pushed, released, q = _run_script(policy, batch, script)
    assert sorted(released) == sorted(pushed) and len(q) == 0  # nothing lost or duplicated
    order = {rid: k for k, rid in enumerate(pushed)}
    for pos, rid in enumerate(released):
        overtakers = [x for x in released[:pos] if order[x] > order[rid]]
        # Only requests of the same batch can overtake: fewer than sched_batch of them, all pushed
        # within sched_batch of it.
        assert len(overtakers) <= batch - 1
        assert all(order[x] - order[rid] < batch for x in overtakers)


@FAST
@given(st.integers(1, 20), ops)
def test_fcfs_preserves_arrival_order(batch, script):
    pushed, released, _ = _run_script("fcfs", batch, script)
    assert released == pushed


@FAST
@given(st.sampled_from(["sjf", "ljf"]), st.integers(1, 20), st.lists(st.integers(0, 4000), max_size=80))
def test_static_queue_releases_arrival_chunks_each_sorted(policy, batch, prompts):
    q = make_prefill_queue(policy, sched_batch=batch)
    for k, p in enumerate(prompts):
        q.push(req(f"r{k}", prompt=p, arrival=k), now=0)
    sign = 1 if policy == "sjf" else -1
    expected: list[str] = []
    for start in range(0, len(prompts), batch):
        chunk = list(range(start, min(start + batch, len(prompts))))
        expected += [f"r{k}" for k in sorted(chunk, key=lambda k: (sign * prompts[k], k))]
    # Release in dribs (one at a time) to check the batch survives across pop_ready calls.
    out: list[str] = []
    while len(q):
        out += [r.id for r in q.pop_ready(0, 1, 2)]
    assert out == expected


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
