"""Goodput: attainment of hand-made runs, the bisection on a known threshold, the CLI on a tiny run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.goodput import SLO, attainment, bisect_rate, with_slo


def _rec(ttft_ms: float | None, tpot_ms: float | None, error: str | None = None) -> dict:
    ms = {"ttft_s": ttft_ms, "tpot_s": tpot_ms}
    return {**{k: None if v is None else v / 1000 for k, v in ms.items()},
            "jct_s": None if error or ttft_ms is None else 1.0, "error": error, "arrival": 0.0}  # fmt: skip


def test_attainment_counts_requests_meeting_both_slos() -> None:
    slo = SLO(ttft_ms=100.0, tpot_ms=10.0)
    runs = [
        _rec(50, 5),  # meets both
        _rec(100, 10),  # on the line: meets
        _rec(150, 5),  # TTFT miss
        _rec(50, 12),  # TPOT miss
        _rec(50, None),  # one-token answer: TTFT only, meets
        _rec(50, 5, error="not finished"),  # failed: misses
        _rec(None, None),  # never started: misses
        _rec(500, 50),  # both miss
    ]
    assert attainment(runs, slo) == pytest.approx(3 / 8)
    assert attainment(runs[:2], slo) == 1.0
    assert attainment([_rec(150, 5)], SLO(200.0, 4.0)) == 0.0  # TPOT over the SLO even though TTFT is fine
    with pytest.raises(ValueError):
        attainment([], slo)


@pytest.mark.parametrize("threshold", [0.7, 3.0, 42.0, 900.0])
@pytest.mark.parametrize("guess", [(1.0, 2.0), (10.0, 100.0), (0.5, 2000.0)])
def test_bisection_finds_a_known_threshold(threshold: float, guess: tuple[float, float]) -> None:
    # attainment falls with the rate and crosses 90% at `threshold`; the bracket is expanded either way
    calls = []

    def f(rate: float) -> float:
        calls.append(rate)
        return 1.0 / (1.0 + (rate / threshold) ** 8 / 9)  # 0.9 at the threshold

    b = bisect_rate(f, *guess, target=0.9, rel_tol=0.01, max_evals=40)
    assert b.bracketed
    assert threshold * 0.99 <= b.rate <= threshold * (1 + 1e-9)
    assert f(b.rate) >= 0.9 and [r for r, _ in b.points] == sorted(set(calls))
    assert len(calls) <= 25


def test_bisection_limits() -> None:
    assert bisect_rate(lambda r: 0.0, 1.0, 2.0, min_rate=0.1).rate == 0.0  # nothing meets it
    b = bisect_rate(lambda r: 1.0, 1.0, 2.0, max_evals=5)  # everything meets it: out of evaluations
    assert not b.bracketed and b.rate == 32.0
    step = bisect_rate(lambda r: 1.0 if r <= 5 else 0.0, 1.0, 8.0, rel_tol=0.001, max_evals=40)
    assert 4.99 <= step.rate <= 5.0
    with pytest.raises(ValueError):
        bisect_rate(lambda r: 1.0, 2.0, 1.0)


def test_tetri_plans_for_the_slo_it_is_measured_on() -> None:
    slo = SLO(120.0, 10.5, 0.9)
    assert with_slo("colocated-vllm", slo) == "colocated-vllm"
    want = "tetri+plan_objective=slo,plan_ttft_slo_ms=120,plan_tpot_slo_ms=10.5,plan_slo_share=0.9"
    assert with_slo("tetri", slo) == want
    assert with_slo("tetri+late_binding=none", slo).startswith("tetri+late_binding=none,plan_objective=slo,")
    assert with_slo("tetri+plan_objective=balanced", slo) == "tetri+plan_objective=balanced"


def test_cli_tiny_simulated_run(tmp_path) -> None:
    out = tmp_path / "gp"
    res = CliRunner().invoke(app, ["goodput", "--instances", "2", "--span-s", "8", "--rel-tol", "0.2",
                                   "--systems", "colocated-vllm,colocated-sarathi", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    case = doc["cases"]["Mixed, KV profile"]
    assert case["slo"]["ttft_ms"] == pytest.approx(5 * case["light_load"]["mean_ttft_ms"])
    assert case["slo"]["tpot_ms"] == pytest.approx(1.5 * case["light_load"]["mean_tpot_ms"])
    for s in ("colocated-vllm", "colocated-sarathi"):
        r = case["seeds"]["0"][s]
        assert r["goodput_rps"] > 0 and r["at_goodput"]["attainment"] >= 0.9
        assert any(p["attainment"] < 0.9 and p["rate"] > r["goodput_rps"] for p in r["points"])
    assert (out / "goodput_attainment.png").stat().st_size > 0
    assert "| Mixed | profile |" in (out / "goodput.md").read_text()


@pytest.mark.parametrize(
    ("args", "hint"),
    [(["--systems", "nope"], "--systems"), (["--workload", "Nope"], "--workload"),
     (["--systems", "tetri+bogus=1"], "--systems"), (["--share", "1.5"], "--share"),
     (["--slo-tpot-ms", "-1"], "--slo-tpot-ms"), (["--backend", "gpu"], "--backend")],
)  # fmt: skip
def test_cli_usage_errors(args: list[str], hint: str) -> None:
    res = CliRunner().invoke(app, ["goodput", *args])
    assert res.exit_code == 2 and hint in res.output


def test_slo_planner_can_choose_late_binding_too() -> None:
    from backends.engines.simulated.profiles import get_timing
    from bench.workloads import build_workload
    from orchestrator.sim import simulate

    tm = get_timing("h100-llama-2-7b")
    reqs = build_workload("Mixed", 600, rate=None, seed=0, max_context=tm.max_context).with_arrivals(12.0, 1).requests
    name = "tetri+plan_objective=slo,plan_ttft_slo_ms=150,plan_tpot_slo_ms=10.5,plan_slo_share=0.9"
    res = simulate(name + ",plan_late_binding=choose", tm, 4, reqs)
    plan = res.extra["plan"]
    keys = set(plan["candidates"])
    assert any(k.endswith("late_binding=none") for k in keys) and any("late_binding" not in k for k in keys)
    assert plan["late_binding"] in ("busiest", "none") and res.config["late_binding"] == plan["late_binding"]
    best = max(plan["candidates"].values(), key=lambda c: (c["meets_slo"], -c["mean_jct_ms"] if c["meets_slo"]
                                                           else c["slo_attainment"]))  # fmt: skip
    chosen = f"{plan['prefill']}:{plan['decode']}" + ("" if plan["late_binding"] == "busiest" else " late_binding=none")
    assert plan["candidates"][chosen] is best
    fixed = simulate(name, tm, 4, reqs).extra["plan"]  # the default: late binding as configured, not planned
    assert "late_binding" not in fixed and not any("late_binding" in k for k in fixed["candidates"])
