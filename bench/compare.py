"""`tetri bench compare`: one workload (or several) against several serving systems, side by side.

Backends:

* ``sim``: the in-process discrete-event cluster (orchestrator/sim/) with a calibrated timing
  profile; every system gets the same instance count and the same requests.
* ``native``: the same systems live on this machine (``tetri up`` with the built-in engine), small
  scale: see ``bench/live.py``.

Offered load: ``--rate`` in requests/s, ``inf`` (all at once), or ``auto`` (default): ``--load`` ×
the co-located vLLM-style baseline's capacity, measured by simulating it on the same requests all
arriving at once (completed requests / makespan). ``--load 1`` offers exactly what the baseline can
sustain, the regime where the paper's gains show; the report states the rate used.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from bench.metrics import by_class, summarize
from bench.spec import BASELINE, SUMMARY_KEYS, CompareSpec
from bench.spec import load_workload as _load_workload
from bench.spec import rate_value as _rate_value
from bench.spec import relative as _relative


def compare_sim(spec: CompareSpec, progress: Any = None) -> dict[str, Any]:
    from backends.engines.simulated.profiles import get_timing
    from orchestrator.sim import simulate, system_config

    tm = get_timing(spec.profile, network=spec.network, kv_tokens=spec.kv_tokens)
    out: dict[str, Any] = {
        "backend": "sim",
        "profile": spec.profile,
        "timing": tm.describe(),
        "instances": spec.instances,
        "requests": spec.requests,
        "seed": spec.seed,
        "network": spec.network,
        "workloads": {},
    }
    for wname in spec.workloads:
        base = _load_workload(spec, wname, tm.max_context)
        rate = _rate_value(spec)
        rate_source = "given"
        if rate is None:
            probe = simulate(BASELINE, tm, spec.instances, base.with_arrivals(math.inf, spec.seed + 1).requests,
                             seed=spec.seed)  # fmt: skip
            cap = summarize(probe.requests, spec.instances)["throughput_rps"] or 1.0
            rate = spec.load * cap
            rate_source = f"auto: {spec.load:g} x {BASELINE} capacity {cap:.2f} req/s (burst probe)"
        wl = base.with_arrivals(rate, spec.seed + 1)
        wres: dict[str, Any] = {
            "workload": wl.stats(),
            "rate": rate if math.isfinite(rate) else "inf",
            "rate_source": rate_source,
            "systems": {},
        }
        for sname in spec.systems:
            cfg = system_config(sname)
            t0 = time.perf_counter()
            res = simulate(cfg, tm, spec.instances, wl.requests, seed=spec.seed)
            summ = summarize(res.requests, spec.instances)
            summ["busy_instance_seconds"] = res.busy_instance_s
            summ["sim_wall_s"] = time.perf_counter() - t0
            summ["preemptions"] = res.preemptions
            summ["flips"] = res.flips
            summ["split"] = res.split
            wres["systems"][sname] = {
                "summary": summ,
                "by_class": by_class(res.requests, spec.instances),
                "config": res.config,
                "split": res.split,
                "extra": res.extra,
                "requests": res.requests,
            }
            if progress:
                progress(wname, sname, summ)
        _relative(wres)
        out["workloads"][wname] = wres
    return out


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """The --json summary: {"systems": {NAME: {...}}} for one workload, plus "workloads" for all."""
    per_wl: dict[str, Any] = {}
    for wname, wres in results["workloads"].items():
        per_wl[wname] = {
            "rate": wres["rate"],
            "systems": {
                name: {
                    **{k: s["summary"].get(k) for k in SUMMARY_KEYS},
                    "split": s.get("split"),
                    "relative": s.get("relative", {}),
                }
                for name, s in wres["systems"].items()
            },
        }
    out: dict[str, Any] = {"backend": results.get("backend"), "profile": results.get("profile"),
                           "instances": results.get("instances")}  # fmt: skip
    first = next(iter(per_wl.values()), {"systems": {}, "rate": None})
    out["workload"] = next(iter(per_wl), None)
    out["rate"] = first["rate"]
    out["systems"] = first["systems"]
    if len(per_wl) > 1:
        out["workloads"] = per_wl
    return out


def write_results(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    from bench.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": out_dir / "results.json"}
    paths["results"].write_text(json.dumps(results, indent=1, default=str))
    paths.update(write_report(results, out_dir))
    return paths


def run_compare(spec: CompareSpec, out_dir: Path | None = None, progress: Any = None) -> dict[str, Any]:
    if spec.backend == "sim":
        results = compare_sim(spec, progress)
    elif spec.backend in ("native", "live"):
        from bench.live import compare_live

        results = compare_live(spec, progress)
    else:
        raise ValueError(f"unknown backend {spec.backend!r} (sim or native)")
    if out_dir is not None:
        results["files"] = {k: str(v) for k, v in write_results(results, out_dir).items()}
    return results
