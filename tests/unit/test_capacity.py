"""The steady-state decode capacity and JCT floor, and the planner's use of it."""

from __future__ import annotations

import json
import math

import pytest

from backends.engines.simulated.profiles import get_timing
from backends.engines.simulated.timing import LinearTimingModel
from bench.headroom import OVER_CAPACITY_JCT_S, headroom, markdown, run_point, steady_window
from bench.workloads import build_workload
from orchestrator.sim import system_config
from orchestrator.sim.capacity import capacity_rate, decode_floor, token_weighted_context
from orchestrator.sim.planner import plan_layout, recommend_split


@pytest.fixture(scope="module")
def h100():
    return get_timing("h100-llama-2-7b")


@pytest.fixture(scope="module")
def lphd(h100):
    reqs = build_workload("LPHD", 2000, rate=None, seed=0, max_context=h100.max_context).requests
    return [r.prompt_tokens for r in reqs], [r.output_tokens for r in reqs]


def test_token_weighted_context_averages_over_decode_tokens():
    # request 1: prompt 10, 3 tokens -> decode tokens at 11, 12 (mean p + o/2 = 11.5), 2 of them;
    # request 2: prompt 100, 1 token -> no decode token, no weight.
    assert token_weighted_context([10, 100], [3, 1]) == pytest.approx(11.5)
    assert token_weighted_context([5], [1]) == 0.0


def test_floor_matches_the_closed_form_on_a_linear_model():
    """t(b) = base + dec·b + ctx·b·c̄ and a prompt's marginal cost tok·p + unit·p² + seq: the
    smallest batch that keeps up solves (1 − ρ)·b / t(b) = demand."""
    tm = LinearTimingModel(base_ms=10.0, per_token_ms=0.01, per_unit_ms=1e-5, per_seq_ms=0.5,
                           per_decode_ms=0.2, per_ctx_ms=0.001, total_kv_tokens=10**6)  # fmt: skip
    prompts, outputs = [100, 300], [201, 201]  # c̄ = p + o/2: 200.5 and 400.5, mean 300.5
    rate, m = 8.0, 2
    f = decode_floor(tm, prompts, outputs, rate, m)
    ctx = 300.5
    demand = rate * 200 / m  # tokens/s per instance
    rho = rate / m * sum(0.01 * p + 1e-5 * p * p + 0.5 for p in prompts) / len(prompts) / 1000
    need_per_ms = demand / (1 - rho) / 1000
    b = need_per_ms * 10.0 / (1 - need_per_ms * (0.2 + 0.001 * ctx))
    assert f.demand_tok_s == pytest.approx(demand)
    assert f.batch == pytest.approx(b, rel=1e-3)
    step_ms = 10.0 + (0.2 + 0.001 * ctx) * b  # the model rounds the context to whole tokens
    assert f.tpot_ms == pytest.approx(step_ms, rel=1e-3)
    ttft = (tm.prefill_s(100) + tm.prefill_s(300)) / 2 * 1000
    assert f.jct_floor_ms == pytest.approx(ttft + 200 * f.tpot_ms)
    assert f.sustainable and 0 < f.utilisation < 1
    # prompts prefilled elsewhere (on a prefill pool) take none of these instances' time: the share
    # is the prefilled-here prompts' cost spread over every request
    half = decode_floor(tm, prompts, outputs, rate, m, prefilled_here=[True, False])
    rho_half = rate / m * (0.01 * 100 + 1e-5 * 100 * 100 + 0.5) / 2 / 1000
    assert half.prefill_share == pytest.approx(rho_half)
    assert half.batch < f.batch and half.utilisation < f.utilisation
    none = decode_floor(tm, prompts, outputs, rate, m, prefilled_here=[False, False])
    assert none.prefill_share == 0.0 and none.utilisation == pytest.approx(none.demand_tok_s / none.capacity_tok_s)


def test_over_capacity_has_no_floor_and_capacity_rate_is_the_boundary(h100, lphd):
    prompts, outputs = lphd
    cap = capacity_rate(h100, prompts, outputs, 4)
    assert decode_floor(h100, prompts, outputs, 0.99 * cap, 4).sustainable
    over = decode_floor(h100, prompts, outputs, 1.01 * cap, 4)
    assert not over.sustainable and math.isinf(over.jct_floor_ms) and math.isinf(over.batch)
    # capacity scales with the instance count, and a batch cap lowers it
    assert capacity_rate(h100, prompts, outputs, 8) == pytest.approx(2 * cap, rel=1e-3)
    assert capacity_rate(h100, prompts, outputs, 4, max_batch=64) < 0.8 * cap
    # more load needs a bigger batch, so a slower step
    lo, hi = (decode_floor(h100, prompts, outputs, x * cap, 4) for x in (0.3, 0.8))
    assert lo.batch < hi.batch and lo.tpot_ms < hi.tpot_ms and lo.jct_floor_ms < hi.jct_floor_ms


def test_no_system_beats_the_floor_in_steady_state_and_the_best_comes_close(h100):
    """Requests scored once the run is warm, below capacity: every system's mean JCT is at or above
    the floor (2% for the fluid estimate), and the best one is within 10% of it, so the floor is
    not a vacuous bound."""
    probe = build_workload("LPHD", 4000, rate=None, seed=0, max_context=h100.max_context).requests
    cap = capacity_rate(h100, [r.prompt_tokens for r in probe], [r.output_tokens for r in probe], 2)
    pt = run_point(h100, "LPHD", 2, 0.6 * cap, ("colocated-vllm", "colocated-sarathi", "tetri"), seed=0)
    floor = pt["floor"]["jct_floor_ms"]
    jcts = [s["mean_jct_ms"] for s in pt["systems"].values()]
    assert all(j >= 0.98 * floor for j in jcts), (floor, jcts)
    assert min(jcts) <= 1.10 * floor, (floor, jcts)
    assert all(s["scored"] > 200 for s in pt["systems"].values())


def test_planner_drops_a_layout_whose_decode_pool_cannot_keep_up(h100, lphd):
    """LPHD at 0.9 of 4 instances' decode capacity: 3 decode instances would be at 1.2, a backlog
    that grows by the minute, which a 60 s resample does not show. Only sustainable layouts stay."""
    prompts, outputs = lphd
    cfg = system_config("tetri")
    rate = 0.9 * capacity_rate(h100, prompts, outputs, 4)
    three = decode_floor(h100, prompts, outputs, rate, 3, prefilled_here=[False] * len(prompts), max_batch=256)
    assert not three.sustainable
    choice = plan_layout(4, prompts, outputs, h100, cfg, first_guess=1, rate=rate)
    assert "1:3" not in choice.candidates and choice.prefill == 0
    assert all(c["util"] < 1 for c in choice.candidates.values())


def test_planner_picks_the_least_overloaded_layout_when_none_keeps_up(h100, lphd):
    prompts, outputs = lphd
    rate = 1.3 * capacity_rate(h100, prompts, outputs, 4)
    choice = recommend_split(4, prompts, outputs, rate, h100, system_config("tetri"))
    assert (choice.prefill, choice.decode) == (0, 4)
    assert list(choice.candidates) == ["0:4"] and choice.candidates["0:4"]["util"] > 1


def test_headroom_writes_its_report(tmp_path, h100):
    doc = headroom(tmp_path, instances=2, workloads=("LPHD",), loads=(0.5,), systems=("colocated-vllm", "tetri"))
    md = (tmp_path / "headroom.md").read_text()
    assert "| LPHD | 0.5 |" in md and "best possible JCT vs vLLM" in md
    assert (tmp_path / "headroom_jct.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "headroom.json").read_text())
    pt = saved["workloads"]["LPHD"]["loads"]["0.5"]
    assert pt["floor"]["jct_floor_ms"] <= pt["systems"]["colocated-vllm"]["mean_jct_ms"]
    assert doc["workloads"]["LPHD"]["capacity_rps"] > 0


def test_headroom_past_capacity_has_no_floor_but_still_a_report():
    """A load past capacity (the CLI takes up to 1.5x) has no floor: the run is sized by a stand-in
    JCT and the report says "over capacity" instead of printing infinities."""
    assert steady_window(math.inf) == (4 * OVER_CAPACITY_JCT_S, 12 * OVER_CAPACITY_JCT_S, 14 * OVER_CAPACITY_JCT_S)
    assert steady_window(2.0) == (8.0, 24.0, 28.0)
    row = {"mean_jct_ms": 9000.0, "mean_ttft_ms": 400.0, "split": {"colocated": 4}, "queue_growing": True}
    doc = {
        "profile": "p",
        "instances": 4,
        "seed": 0,
        "wall_s": 1.0,
        "workloads": {
            "LPHD": {
                "loads": {
                    "1.2": {
                        "rate": 130.0,
                        "floor": {"jct_floor_ms": math.inf},
                        "baseline_over_capacity": True,
                        "systems": {"colocated-vllm": row, "tetri": {**row, "mean_jct_ms": 8000.0}},
                    }
                }
            }
        },
    }
    md = markdown(doc)
    assert "none: over capacity" in md and "inf" not in md
    assert "| LPHD | 1.2 † |" in md and "9000 / 400 ↑" in md and "-11%" in md


def test_headroom_cli_answers_bad_input_with_a_usage_error(tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app

    cases = (
        ["--loads", "2"], ["--loads", "x"], ["--instances", "0"], ["--profile", "tpu-v9"],
        ["--workload", "Nope", "--loads", "0.3"], ["--systems", "bogus", "--loads", "0.3", "--instances", "1"],
    )  # fmt: skip
    for args in cases:
        res = CliRunner().invoke(app, ["headroom", "--out", str(tmp_path), *args])
        assert res.exit_code == 2, (args, res.output)  # a usage error, not a traceback (exit 1)
        assert "Invalid value" in res.output, (args, res.output)
    assert not (tmp_path / "headroom.md").exists()
