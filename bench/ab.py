"""`tetri bench ab`: one workload against two deployments, side by side.

* Two URLs (``http://...``): both are driven live by the runner with the same requests, one after
  the other (A first), e.g. SGLang vs TensorRT-LLM pools, or two tetri deployments with different
  policies.
* Two system names: both run in the simulator (``orchestrator/sim/``) with the same profile,
  instance count and requests, e.g. ``--a tetri --b tetri+predictor=oracle``.
Relative numbers are B vs A.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.compare import compare_sim, write_results
from bench.metrics import by_class
from bench.runner import run_workload
from bench.spec import CompareSpec
from bench.spec import load_workload as _load_workload
from bench.spec import rate_value as _rate_value
from bench.spec import relative as _relative


def _is_url(s: str) -> bool:
    return s.startswith("http://") or s.startswith("https://")


def run_ab(
    a: str,
    b: str,
    workload: str,
    requests: int = 100,
    rate: str = "auto",
    load: float = 1.0,
    seed: int = 0,
    profile: str = "h100-llama-2-7b",
    instances: int = 4,
    model: str | None = None,
    model_b: str | None = None,
    length_scale: float = 1.0,
    max_prompt: int | None = None,
    max_output: int | None = None,
    out_dir: Path | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    if _is_url(a) != _is_url(b):
        raise ValueError("--a and --b must both be URLs (live) or both system names (sim)")
    spec = CompareSpec(
        workloads=[workload], requests=requests, rate=rate, load=load, seed=seed, profile=profile,
        instances=instances, systems=[a, b], length_scale=length_scale, max_prompt=max_prompt,
        max_output=max_output,
    )  # fmt: skip
    if not _is_url(a):
        results = compare_sim(spec)
        for wres in results["workloads"].values():
            _relative(wres, refs=(a,))
        results["title"] = f"A/B (simulator): {a} vs {b}"
    else:
        wl = _load_workload(spec, workload, None)
        r = _rate_value(spec)
        if r is None:
            r = 1.0
        wl = wl.with_arrivals(r, seed + 1)
        systems: dict[str, Any] = {}
        for label, url, m in (("A", a, model), ("B", b, model_b or model)):
            res = run_workload(url, wl, model=m, show_progress=show_progress)
            name = f"{label}: {url}"
            systems[name] = {"summary": res["summary"], "by_class": by_class(res["requests"]),
                             "config": {"url": url, "model": res["model"]}, "requests": res["requests"]}  # fmt: skip
        wres = {"workload": wl.stats(), "rate": r if math.isfinite(r) else "inf", "rate_source": "given",
                "systems": systems}  # fmt: skip
        _relative(wres, refs=(next(iter(systems)),))
        results = {"backend": "live", "title": f"A/B (live): {a} vs {b}", "requests": requests, "seed": seed,
                   "workloads": {workload: wres}}  # fmt: skip
    if out_dir is not None:
        write_results(results, out_dir)
    return results
