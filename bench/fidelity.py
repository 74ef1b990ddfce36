"""Fidelity check: the simulator, calibrated to the built-in engine on this CPU, against a live run.

``python -m bench.fidelity --out DIR`` runs a small workload live (``tetri up`` with the native
engine, co-located or 1 prefill + 1 decode) through the runner, simulates the same requests (same
arrival times) with the ``cpu-smollm2`` profile and the matching system, and reports the relative
errors of mean TTFT and mean JCT (target: within 15%). Calibrate first (``tetri bench calibrate``)
so the profile reflects this machine now.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from backends.sim.cluster import simulate
from backends.sim.profiles import get_timing
from bench.live import Deployment, _free_port
from bench.metrics import ratio, summarize
from bench.runner import run_workload
from bench.workloads import build_workload

SETUPS = {
    # name: (tetri up arguments, environment, simulator system, instances)
    "colocated": (["--colocated", "1", "--prefill", "0", "--decode", "0", "--batching", "sarathi"],
                  {"TETRI_MODE": "colocated"}, "colocated-sarathi", 1),
    "disaggregated": (["--prefill", "1", "--decode", "1"],
                      {"TETRI_MODE": "disaggregated", "TETRI_PREFILL_POLICY": "fcfs",
                       "TETRI_DISPATCH_POLICY": "least_loaded", "TETRI_DECODE_ADMISSION": "greedy",
                       "TETRI_PREDICTOR": "constant", "TETRI_FLIP_POLICY": "none"},
                      "disagg-simple+pd_ratio=1:1", 2),
}  # fmt: skip


def run(
    setup: str,
    out: Path,
    requests: int = 12,
    rate: float = 0.15,
    max_prompt: int = 96,
    max_output: int = 24,
    seed: int = 0,
    backend: str = "native",
) -> dict[str, Any]:
    args, env, system, n = SETUPS[setup]
    wl = build_workload("Mixed-natural", requests, rate=None, seed=seed, max_context=4096)
    wl = wl.scaled(1.0, max_prompt, max_output).with_arrivals(rate, seed + 1)
    log_dir = Path(os.environ.get("TETRI_LOG_DIR", "/tmp/tetri-logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    dep = Deployment([*args, "--backend", backend], env, _free_port(), log_dir / f"fidelity-{setup}.log")
    try:
        dep.wait_ready()
        t = time.perf_counter()
        live = run_workload(dep.url, wl, instances=n, show_progress=False)
        live_wall = time.perf_counter() - t
    finally:
        dep.stop()
    # The live prompts were tokenized by the orchestrator: simulate what it actually sent.
    lengths = {r["id"]: r for r in live["requests"]}
    for req in wl.requests:
        got = lengths.get(req.id)
        if got and got.get("output_tokens"):
            req.output_tokens = int(got["output_tokens"])
        if got and got.get("prompt_tokens"):
            req.prompt_tokens = int(got["prompt_tokens"])
    tm = get_timing("cpu-smollm2")
    sim = simulate(system, tm, n, wl.requests, seed=seed)
    s_live, s_sim = live["summary"], summarize(sim.requests, n)
    doc = {
        "setup": setup,
        "system": system,
        "backend": backend,
        "workload": wl.stats(),
        "profile": tm.describe(),
        "live": {k: s_live.get(k) for k in ("mean_ttft_ms", "mean_jct_ms", "mean_tpot_ms", "completed", "errors")},
        "sim": {k: s_sim.get(k) for k in ("mean_ttft_ms", "mean_jct_ms", "mean_tpot_ms", "completed", "errors")},
        "error_ttft": ratio(s_sim.get("mean_ttft_ms"), s_live.get("mean_ttft_ms")),
        "error_jct": ratio(s_sim.get("mean_jct_ms"), s_live.get("mean_jct_ms")),
        "live_wall_s": live_wall,
        "load_avg": os.getloadavg(),
    }
    out.mkdir(parents=True, exist_ok=True)
    raw = {**doc, "live_requests": live["requests"], "sim_requests": sim.requests}
    (out / f"fidelity-{setup}.json").write_text(json.dumps(raw, indent=1, default=str))
    return doc


def main() -> None:  # pragma: no cover - CLI
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-fidelity"))
    ap.add_argument("--setup", default="colocated", choices=sorted(SETUPS))
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--rate", type=float, default=0.15)
    ap.add_argument("--max-prompt", type=int, default=96)
    ap.add_argument("--max-output", type=int, default=24)
    ap.add_argument("--backend", default="native")
    a = ap.parse_args()
    doc = run(a.setup, a.out, a.requests, a.rate, a.max_prompt, a.max_output, backend=a.backend)
    show = {k: v for k, v in doc.items() if k not in ("profile",)}
    print(json.dumps(show, indent=1, default=str))
    if any(x is None or not math.isfinite(x) for x in (doc["error_ttft"], doc["error_jct"])):
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
