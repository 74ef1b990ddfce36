"""The prefill queue (orchestrator/policies/prefill_queue.py): hypothesis properties plus worked examples.

The properties are stated independently of the implementation (an oracle or an invariant computed
here), so each one fails when the behaviour it names breaks.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.policies.prefill_queue import PrefillQueue, make_prefill_queue
from tests.policy_helpers import FAST, req


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
