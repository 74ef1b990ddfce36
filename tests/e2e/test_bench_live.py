"""End to end: `tetri bench compare --backend native` starts real deployments (`tetri up`), drives
them with the streaming runner and writes the report files. Sim workers by default (the native
scheduler over the cpu-smollm2 timing model, no model load); TETRI_TEST_NATIVE_BENCH=1 runs the
built-in engine instead (minutes on a 2-core machine)."""

from __future__ import annotations

import json
import os

import pytest

from bench.compare import CompareSpec, compact, run_compare

pytestmark = pytest.mark.slow

BACKENDS = ["sim"] + (["native"] if os.environ.get("TETRI_TEST_NATIVE_BENCH") == "1" else [])


@pytest.mark.parametrize("live_backend", BACKENDS)
def test_live_compare_writes_the_report_files(tmp_path, monkeypatch, live_backend):
    monkeypatch.setenv("TETRI_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("TETRI_CACHE_DIR", os.environ.get("TETRI_CACHE_DIR", str(tmp_path / "cache")))
    spec = CompareSpec(
        workloads=["synthetic:24:4"], backend="native", live_backend=live_backend, instances=2, requests=3,
        rate="4", systems=["tetri"],
    )  # fmt: skip
    res = run_compare(spec, out_dir=tmp_path / "out")
    out = tmp_path / "out"
    for f in ("report.md", "results.json", "synthetic_24_4_ttft_cdf.png", "synthetic_24_4_jct_cdf.png"):
        assert (out / f).exists(), f
    summary = compact(res)
    for name in ("tetri",):
        s = summary["systems"][name]
        assert s["completed"] == 3 and s["errors"] == 0, (name, s)
        assert 0 < s["mean_ttft_ms"] < s["mean_jct_ms"]
    raw = json.loads((out / "results.json").read_text())
    recs = raw["workloads"]["synthetic:24:4"]["systems"]["tetri"]["requests"]
    assert all(r["output_tokens"] == 4 and len(r["gaps_s"]) >= 1 for r in recs)


def test_live_deployments_match_the_simulated_systems():
    # tetri runs with mode=auto (its co-located fallback on; a planned P = 0 runs all co-located),
    # disagg-simple pinned to plain disaggregation; the baselines co-located.
    from types import SimpleNamespace

    from bench.live import deployment_args

    spec = SimpleNamespace(live_backend="native", model="m", kv_tokens=None)
    args, env = deployment_args("tetri", 2, (0, 2), spec)
    assert args[:4] == ["--prefill", "0", "--decode", "2"] and env["TETRI_MODE"] == "auto"
    assert "TETRI_COLOCATE_ON_DECODE" not in env  # the orchestrator's default: on
    args, env = deployment_args("disagg-simple", 2, (1, 1), spec)
    assert args[:4] == ["--prefill", "1", "--decode", "1"] and env["TETRI_MODE"] == "disaggregated"
    assert env["TETRI_COLOCATE_ON_DECODE"] == "false"
    args, env = deployment_args("tetri+pd_ratio=1:1,prefill_policy=fcfs", 2, (0, 2), spec)
    assert args[:4] == ["--prefill", "1", "--decode", "1"] and env["TETRI_PREFILL_POLICY"] == "fcfs"
    args, env = deployment_args("colocated-sarathi", 2, (1, 1), spec)
    assert "--colocated" in args and env == {"TETRI_MODE": "colocated"}
