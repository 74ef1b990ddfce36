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

from backends.engines.simulated.profiles import get_timing
from bench.calibrate import calibrate_cpu, calibrate_from_workers
from bench.live import Deployment, _free_port
from bench.metrics import ratio, summarize
from bench.runner import run_workload
from bench.workloads import build_workload
from orchestrator.sim import simulate

SETUPS = {
    # name: (tetri up arguments, environment, simulator system, instances)
    "colocated": (["--colocated", "1", "--prefill", "0", "--decode", "0", "--batching", "sarathi"],
                  {"TETRI_MODE": "colocated"}, "colocated-sarathi", 1),
    "disaggregated": (["--prefill", "1", "--decode", "1"],
                      {"TETRI_MODE": "disaggregated", "TETRI_PREFILL_POLICY": "fcfs",
                       "TETRI_DISPATCH_POLICY": "least_loaded", "TETRI_DECODE_ADMISSION": "greedy",
                       "TETRI_PREDICTOR": "constant", "TETRI_FLIP_POLICY": "none",
                       "TETRI_COLOCATE_HEAVY_HEAVY": "false", "TETRI_COLOCATE_ON_DECODE": "false",
                       "TETRI_COLOCATE_BACKLOG_TOKENS": "0"},
                      "disagg-simple+pd_ratio=1:1,ttft_at=prefill", 2),  # the first token leaves before the hand-off
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
    calibrate: str = "none",
) -> dict[str, Any]:
    """calibrate: ``none`` (the saved cpu-smollm2 profile), ``engine`` (profile a fresh engine right
    before the run) or ``live`` (first serve a calibration workload of other prompts, then fit to the
    passes the deployment's workers logged)."""
    args, env, system, n = SETUPS[setup]
    out.mkdir(parents=True, exist_ok=True)
    profile_path = out / "cpu-smollm2.json"
    if calibrate == "engine":
        # Back to back with the live run: this machine's speed moves with its load (shared cores).
        calibrate_cpu(save=True, path=profile_path)
        os.environ["TETRI_SIM_CPU_PROFILE"] = str(profile_path)
    wl = _workload(requests, rate, max_prompt, max_output, seed)
    log_dir = Path(os.environ.get("TETRI_LOG_DIR", "/tmp/tetri-logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # The workers' prefix cache off: these ShareGPT prompts share the chat template's system prompt,
    # which the live engine would reuse and the simulator (no block ids on this workload) would not.
    env = {**env, "TETRI_ADMIN_TOKEN": _ADMIN_TOKEN, "TETRI_PREFIX_CACHING": "0"}
    dep = Deployment([*args, "--backend", backend], env, _free_port(), log_dir / f"fidelity-{setup}.log")
    try:
        dep.wait_ready()
        if calibrate == "live":
            since = time.time()
            # Other prompts at the same rate: the passes are fitted under the load they will predict
            # (calibrating at 4x the rate was tried: its own CPU contention biased the fit by 50%).
            calib = _workload(requests, rate, max_prompt, max_output, seed + 1000)
            run_workload(dep.url, calib, instances=n, show_progress=False)
            calibrate_from_workers([w["url"] for w in _worker_infos(dep.url)], since, path=profile_path)
            os.environ["TETRI_SIM_CPU_PROFILE"] = str(profile_path)
        t = time.perf_counter()
        live = run_workload(dep.url, wl, instances=n, show_progress=False)
        live_wall = time.perf_counter() - t
        chunk = max(info["chunk_size"] for info in _worker_infos(dep.url))
    finally:
        dep.stop()
    # Simulate the ChunkSize the workers actually ran (theirs comes from the engine's knee profile).
    system += ("," if "+" in system else "+") + f"chunk_size={chunk}"
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
        "calibrated_now": calibrate,
        "live_wall_s": live_wall,
        "load_avg": os.getloadavg(),
    }
    raw = {**doc, "live_requests": live["requests"], "sim_requests": sim.requests}
    (out / f"fidelity-{setup}.json").write_text(json.dumps(raw, indent=1, default=str))
    return doc


_ADMIN_TOKEN = "fidelity-check"


def _workload(requests: int, rate: float, max_prompt: int, max_output: int, seed: int) -> Any:
    wl = build_workload("Mixed-natural", requests, rate=None, seed=seed, max_context=4096)
    return wl.scaled(1.0, max_prompt, max_output).with_arrivals(rate, seed + 1)


def _worker_infos(url: str) -> list[dict[str, Any]]:
    """Every worker's /info (plus its url), found through the orchestrator's admin API."""
    import httpx

    headers = {"authorization": f"Bearer {_ADMIN_TOKEN}"}
    instances = httpx.get(f"{url}/admin/instances", headers=headers, timeout=10).raise_for_status().json()
    infos = []
    for inst in instances["instances"]:
        info = httpx.get(f"{inst['url'].rstrip('/')}/info", timeout=10).raise_for_status().json()
        infos.append({**info, "url": inst["url"]})
    return infos


def main() -> None:  # pragma: no cover - CLI
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-fidelity"))
    ap.add_argument("--setup", default="colocated", choices=sorted(SETUPS))
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--rate", type=float, default=0.15)
    ap.add_argument("--max-prompt", type=int, default=96)
    ap.add_argument("--max-output", type=int, default=24)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--calibrate", default="none", choices=("none", "engine", "live"),
                    help="engine: profile a fresh engine right before; live: fit to a calibration run's passes")
    a = ap.parse_args()
    doc = run(a.setup, a.out, a.requests, a.rate, a.max_prompt, a.max_output, backend=a.backend,
              calibrate=a.calibrate)  # fmt: skip
    show = {k: v for k, v in doc.items() if k not in ("profile",)}
    print(json.dumps(show, indent=1, default=str))
    if any(x is None or not math.isfinite(x) for x in (doc["error_ttft"], doc["error_jct"])):
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
