"""Prefix caching in the simulator: per-instance caches, session turns that wait for the previous
answer, cache-aware placement (precise or approximate), and the TTFT it buys."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from backends.engines.simulated.profiles import get_timing
from bench.metrics import summarize
from orchestrator.sim import simulate
from orchestrator.sim.prefix import SimPrefixCache


@dataclass
class Turn:
    id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
    blocks: tuple[int, ...] = ()
    after: str | None = None
    think_s: float = 0.0
    cls: str = "session"


def sessions(n: int, turns: int, rate: float, seed: int = 0) -> list[Turn]:
    """Each turn's prompt is the conversation so far plus a new message; block ids are per session."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for s in range(n):
        t += rng.expovariate(rate)
        history, prev = 400, None
        for k in range(turns):
            prompt, answer = history + rng.randint(40, 200), rng.randint(50, 300)
            blocks = tuple(s * 100_000 + b for b in range((prompt + answer) // 16))
            out.append(Turn(f"s{s}t{k}", t + k * 1e-6, prompt, answer, blocks, prev, rng.expovariate(1 / 2.0)))
            prev, history = f"s{s}t{k}", prompt + answer
    return out


@pytest.fixture(scope="module")
def h100():
    return get_timing("h100-llama-2-7b")


def test_the_cache_reuses_leading_blocks_up_to_the_last_token_and_evicts_lru():
    cache = SimPrefixCache(capacity_blocks=4)
    cache.insert([1, 2, 3])
    assert cache.reuse([1, 2, 3, 4], prompt_tokens=64) == 48  # 3 blocks, all but the last token's block
    assert cache.reuse([1, 2, 3], prompt_tokens=48) == 32  # a fully cached prompt recomputes its last block
    assert cache.reuse([9, 1], prompt_tokens=32) == 0  # only a leading run counts
    cache.insert([5, 6])  # 5 blocks > 4: the least recently used (1? no: 1-3 were touched) goes
    assert len(cache.blocks) == 4 and cache.hit_tokens == 80 and cache.query_tokens == 144


def test_turns_wait_for_the_previous_answer_and_reuse_their_history(h100):
    reqs = sessions(6, 3, rate=1.0)
    res = simulate("colocated-sarathi+prefix_cache=1,global_scheduler=prefix_aware", h100, 2, reqs)
    rec = {r["id"]: r for r in res.requests}
    assert all(r["jct_s"] is not None for r in rec.values())
    for turn in reqs:
        if turn.after is not None:
            before = rec[turn.after]
            assert rec[turn.id]["arrival"] == pytest.approx(before["finish"] + turn.think_s)
            assert rec[turn.id]["cached_tokens"] > 0  # its history was cached where it ran
            assert rec[turn.id]["d_inst"] == before["d_inst"]  # cache-aware placement kept the session
    off = simulate("colocated-sarathi", h100, 2, reqs)
    assert all(r["cached_tokens"] == 0 for r in off.requests)


def test_cache_aware_placement_halves_ttft_at_load_and_beats_cache_blind_placement(h100):
    reqs = sessions(600, 4, rate=40.0, seed=1)
    runs = {
        name: summarize(simulate(name, h100, 16, reqs).requests)
        for name in (
            "colocated-sarathi",
            "colocated-sarathi+prefix_cache=1",
            "colocated-sarathi+prefix_cache=1,global_scheduler=prefix_aware",
            "colocated-sarathi+prefix_cache=1,prefix_index=approx,global_scheduler=sglang_cache_aware",
        )
    }
    base, blind, aware, sglang = runs.values()
    assert aware["mean_ttft_ms"] * 2 <= base["mean_ttft_ms"]
    assert aware["mean_jct_ms"] <= base["mean_jct_ms"]
    assert aware["mean_ttft_ms"] < blind["mean_ttft_ms"]  # a cache without placement that knows it
    assert sglang["mean_ttft_ms"] < base["mean_ttft_ms"]


def test_disaggregated_runs_cache_on_both_sides_and_skip_held_blocks_in_the_transfer(h100):
    reqs = sessions(8, 3, rate=2.0, seed=2)
    res = simulate("tetri+pd_ratio=1:1,prefix_cache=1,predictor=oracle", h100, 2, reqs)
    assert all(r["jct_s"] is not None for r in res.requests)
    later = [r for r in res.requests if not r["id"].endswith("t0")]
    assert sum(r["cached_tokens"] for r in later) > 0
