"""Workload classes, Poisson arrivals, traces: statistical checks with fixed seeds (no dataset needed)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from bench.workloads import (
    CLASSES,
    PoolItem,
    Workload,
    build_workload,
    classify,
    parse_rates,
    poisson_arrivals,
)


def _pool(n: int = 4000, seed: int = 1) -> list[PoolItem]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = int(rng.lognormvariate(5.0, 1.2)) + 4  # median ~150, heavy tail past 512
        o = int(rng.lognormvariate(5.0, 0.9)) + 4
        out.append(PoolItem(p, o, i, f"s{i}"))
    return out


def test_classify_thresholds_are_strict():
    assert classify(512, 128) == "LPLD"
    assert classify(513, 128) == "HPLD"
    assert classify(512, 129) == "LPHD"
    assert classify(513, 129) == "HPHD"


@pytest.mark.parametrize("cls", CLASSES)
def test_class_workloads_only_contain_their_class(cls):
    wl = build_workload(cls, 300, seed=3, pool=_pool(), max_context=None)
    assert len(wl) == 300
    for r in wl.requests:
        assert r.cls == cls
        assert (r.prompt_tokens > 512) == cls.startswith("HP")
        assert (r.output_tokens > 128) == cls.endswith("HD")


def test_mixed_is_uniform_over_the_four_classes():
    wl = build_workload("Mixed", 402, seed=5, pool=_pool(), max_context=None)
    counts = wl.class_counts()
    assert sum(counts.values()) == 402
    assert all(100 <= counts[c] <= 101 for c in CLASSES)
    # shuffled: the first 40 requests are not all one class
    assert len({r.cls for r in wl.requests[:40]}) == 4


def test_mixed_natural_follows_the_pool_proportions():
    pool = _pool(20000, seed=2)
    natural = {c: 0 for c in CLASSES}
    for p in pool:
        natural[classify(p.prompt_tokens, p.output_tokens)] += 1
    wl = build_workload("Mixed-natural", 4000, seed=7, pool=pool, max_context=None)
    counts = wl.class_counts()
    for c in CLASSES:
        expect = natural[c] / len(pool)
        got = counts[c] / 4000
        sd = math.sqrt(expect * (1 - expect) / 4000)
        assert abs(got - expect) < 4 * sd + 1e-9, (c, got, expect)


def test_max_context_filter():
    wl = build_workload("Mixed-natural", 500, seed=1, pool=_pool(), max_context=600)
    assert all(r.prompt_tokens + r.output_tokens <= 600 for r in wl.requests)


def test_same_seed_same_workload_other_seed_differs():
    a = build_workload("Mixed", 200, rate=5.0, seed=11, pool=_pool())
    b = build_workload("Mixed", 200, rate=5.0, seed=11, pool=_pool())
    c = build_workload("Mixed", 200, rate=5.0, seed=12, pool=_pool())
    key = lambda w: [(r.prompt_tokens, r.output_tokens, round(r.arrival, 9)) for r in w.requests]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_poisson_arrivals_rate_and_exponential_gaps():
    rate = 8.0
    arr = poisson_arrivals(20000, rate, seed=42)
    gaps = [b - a for a, b in zip([0.0, *arr[:-1]], arr, strict=True)]
    assert all(g > 0 for g in gaps)
    mean = statistics.fmean(gaps)
    # mean 1/rate: standard error of the mean = (1/rate)/sqrt(n)
    assert abs(mean - 1 / rate) < 4 * (1 / rate) / math.sqrt(len(gaps))
    # exponential: coefficient of variation 1, P(gap > mean) = e^-1
    cv = statistics.pstdev(gaps) / mean
    assert 0.95 < cv < 1.05
    frac = sum(g > 1 / rate for g in gaps) / len(gaps)
    assert abs(frac - math.exp(-1)) < 0.015
    # counts in unit windows are Poisson: variance ≈ mean
    horizon = int(arr[-1])
    counts = [0] * horizon
    for t in arr:
        if int(t) < horizon:
            counts[int(t)] += 1
    m = statistics.fmean(counts)
    assert abs(m - rate) < 0.3
    assert 0.8 < statistics.pvariance(counts) / m < 1.2


def test_poisson_burst_and_determinism():
    assert poisson_arrivals(5, math.inf) == [0.0] * 5
    assert poisson_arrivals(5, 0) == [0.0] * 5
    assert poisson_arrivals(50, 3.0, seed=1) == poisson_arrivals(50, 3.0, seed=1)


def test_rate_sweep_parsing():
    assert parse_rates("4") == [4.0]
    assert parse_rates("1,2,4") == [1.0, 2.0, 4.0]
    assert parse_rates("1:3:1") == [1.0, 2.0, 3.0]
    assert parse_rates("inf") == [math.inf]


def test_synthetic_and_openai_body():
    wl = build_workload("synthetic:64:16", 10, rate=2.0, seed=0)
    assert all(r.prompt_tokens == 64 and r.output_tokens == 16 for r in wl.requests)
    body = wl.requests[0].openai_body("m")
    assert body["max_tokens"] == 16 and body["ignore_eos"] is True and body["stream"] is True
    assert len(body["prompt"].split()) == 64


def test_trace_roundtrip_and_replay(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"arrival": 0.5, "prompt_tokens": 10, "output_tokens": 3}\n'
        '# comment\n'
        '{"timestamp": 0.1, "prompt": "hello there", "prompt_len": 2, "output_len": 700}\n'
    )
    wl = build_workload(f"trace:{path}", 0, seed=0)
    assert [r.arrival for r in wl.requests] == [0.1, 0.5]
    assert wl.requests[0].cls == "LPHD" and wl.requests[0].prompt == "hello there"
    out = tmp_path / "o.jsonl"
    wl.to_jsonl(out)
    again = Workload.from_jsonl(out)
    assert [(r.prompt_tokens, r.output_tokens, r.arrival) for r in again.requests] == [
        (r.prompt_tokens, r.output_tokens, r.arrival) for r in wl.requests
    ]
    retimed = build_workload(f"trace:{path}", 0, rate=100.0, seed=0)
    assert retimed.requests[0].arrival != 0.1
