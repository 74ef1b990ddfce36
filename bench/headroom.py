"""How much JCT any scheduler could still win: each system's steady-state mean JCT next to the floor.

``python -m bench.headroom --out DIR`` (or ``tetri bench headroom``) writes ``DIR/headroom.md``,
``DIR/headroom.json`` and ``DIR/headroom_jct.png``. Loads are fractions of the cluster's decode
capacity (``orchestrator.sim.capacity.capacity_rate``: the highest rate whose decode tokens the
instances can generate at all, at the largest batch their KV holds). Past it no layout keeps up.

Each run is long enough to reach steady state, and only requests that arrive once it is warm are
scored: the floor is a steady-state bound, and a run that starts empty decodes small batches while
it warms up. Warm-up is 4 floor-JCTs, the scored window 8, and arrivals go on for 2 more so that
the last scored requests still decode in a full batch.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from rich.progress import Progress

from backends.engines.simulated.profiles import get_timing
from bench.metrics import pct, ratio, summarize
from bench.workloads import build_workload
from orchestrator.sim import simulate
from orchestrator.sim.capacity import capacity_rate, decode_floor, jct_floor_of

SYSTEMS = ("colocated-vllm", "colocated-sarathi", "disagg-simple", "tetri")
VLLM_MAX_SEQS = 256  # SystemConfig.max_num_seqs of colocated-vllm



OVER_CAPACITY_JCT_S = 10.0  # past capacity there is no floor: size the run as if the JCT were this


def steady_window(floor_jct_s: float) -> tuple[float, float, float]:
    """(warm-up end, window end, arrival span) in seconds for a run whose JCT floor is given."""
    j = max(floor_jct_s, 0.5) if math.isfinite(floor_jct_s) else OVER_CAPACITY_JCT_S
    return 4 * j, 12 * j, 14 * j


def run_point(tm: Any, wl: str, instances: int, rate: float, systems: tuple[str, ...], seed: int,
              max_requests: int = 40000) -> dict[str, Any]:  # fmt: skip
    """One workload at one rate: the floor, and every system's mean over the steady window."""
    probe = build_workload(wl, 4000, rate=None, seed=seed, max_context=tm.max_context).requests
    floor = decode_floor(tm, [r.prompt_tokens for r in probe], [r.output_tokens for r in probe], rate, instances)
    warm, end, span = steady_window(floor.jct_floor_ms / 1000.0)
    n = min(max_requests, max(200, int(rate * span)))
    base = build_workload(wl, n, rate=None, seed=seed, max_context=tm.max_context)
    reqs = base.with_arrivals(rate, seed + 1).requests
    end = min(end, reqs[-1].arrival)
    floor = decode_floor(tm, [r.prompt_tokens for r in reqs], [r.output_tokens for r in reqs], rate, instances)
    scored = [r for r in reqs if warm <= r.arrival <= end]
    out: dict[str, Any] = {"rate": rate, "requests": n, "window_s": [warm, end], "floor": floor.to_dict()}
    # The scored requests' own floor: their mean output differs from the whole run's by a few percent.
    out["floor"]["jct_floor_ms"] = jct_floor_of(
        floor, tm, [r.prompt_tokens for r in scored], [r.output_tokens for r in scored]
    ) if scored else floor.jct_floor_ms  # fmt: skip
    out["floor"]["run_jct_floor_ms"] = floor.jct_floor_ms
    # The vLLM-style baseline batches at most 256 sequences: past that batch's capacity its queue grows.
    capped = decode_floor(tm, [r.prompt_tokens for r in reqs], [r.output_tokens for r in reqs], rate, instances,
                          max_batch=VLLM_MAX_SEQS)  # fmt: skip
    out["baseline_over_capacity"] = not capped.sustainable
    out["systems"] = {}
    for s in systems:
        res = simulate(s, tm, instances, reqs, seed=seed)
        window = sorted((r for r in res.requests if warm <= r["arrival"] <= end), key=lambda r: r["arrival"])
        w = summarize(window, instances)
        thirds = [window[k * len(window) // 3:(k + 1) * len(window) // 3] for k in (0, 2)]
        first, last = (sum(r["ttft_s"] or 0.0 for r in t) / max(1, len(t)) for t in thirds)
        out["systems"][s] = {
            "mean_jct_ms": w.get("mean_jct_ms"), "mean_ttft_ms": w.get("mean_ttft_ms"),
            "mean_tpot_ms": w.get("mean_tpot_ms"), "scored": len(window), "split": res.split,
            "moved_by_late_binding": res.extra.get("steals", 0), "requests": len(res.requests),
            "all_mean_jct_ms": summarize(res.requests, instances).get("mean_jct_ms"),
            # a queue that grows through the window: no steady state, the number depends on the run's length
            "queue_growing": last > 2 * first + 0.05,
        }  # fmt: skip
    return out


def headroom(out: Path, profile: str = "h100-llama-2-7b", instances: int = 4,
             workloads: tuple[str, ...] = ("LPHD", "Mixed"), loads: tuple[float, ...] = (0.3, 0.6, 0.9),
             systems: tuple[str, ...] = SYSTEMS, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    t0 = time.perf_counter()
    tm = get_timing(profile)
    doc: dict[str, Any] = {"profile": profile, "instances": instances, "seed": seed, "workloads": {}}
    with Progress() as bar:
        task = bar.add_task("headroom", total=len(workloads) * len(loads))
        for wl in workloads:
            probe = build_workload(wl, 4000, rate=None, seed=seed, max_context=tm.max_context).requests
            cap = capacity_rate(tm, [r.prompt_tokens for r in probe], [r.output_tokens for r in probe], instances)
            points = {}
            for load in loads:
                bar.update(task, description=f"{wl} at {load:g} x capacity")
                points[f"{load:g}"] = run_point(tm, wl, instances, load * cap, systems, seed)
                bar.advance(task)
            doc["workloads"][wl] = {"capacity_rps": cap, "loads": points}
    doc["wall_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "headroom.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "headroom.md").write_text(markdown(doc))
    plot(doc, out / "headroom_jct.png")
    return doc


def markdown(doc: dict[str, Any]) -> str:
    systems = list(next(iter(next(iter(doc["workloads"].values()))["loads"].values()))["systems"])
    lines = [
        f"Profile **{doc['profile']}**, {doc['instances']} instances, seed {doc['seed']}; "
        f"simulated in {doc['wall_s']:.0f} s. Means over the requests that arrive once the run is warm. "
        "The floor is the least mean JCT any scheduler or layout could reach (a fluid estimate, "
        "docs/reproduction.md). † = past the vLLM-style baseline's capacity at 256 sequences per batch, "
        "even before its stalls. ↑ = that system's queue grows through the window (mean TTFT of its last "
        "third over twice its first third's, plus 50 ms): it has no steady state at this load, and its "
        "numbers grow with the run's length.\n",
        "| workload | load (× decode capacity) | rate req/s | JCT floor ms | "
        + " | ".join(f"{n} JCT / TTFT ms" for n in systems)
        + " | best possible JCT vs vLLM | tetri vs vLLM (JCT, TTFT) |",
        "|---|---:|---:|---:|" + "---:|" * len(systems) + "---:|---:|",
    ]
    for wl, w in doc["workloads"].items():
        for load, pt in w["loads"].items():
            s = pt["systems"]
            v, t = s.get("colocated-vllm", {}), s.get("tetri", {})
            floor = pt["floor"]["jct_floor_ms"]
            cells = []
            for name in systems:
                split = s[name]["split"]
                pd = f" ({split['prefill']}:{split['decode']})" if "prefill" in split else ""
                grow = " ↑" if s[name].get("queue_growing") else ""
                cells.append(f"{s[name]['mean_jct_ms']:.0f} / {s[name]['mean_ttft_ms']:.0f}{pd}{grow}")
            mark = " †" if pt.get("baseline_over_capacity") else ""
            vs = "–"
            if v and t:
                jct, ttft = (ratio(t[k], v[k]) for k in ("mean_jct_ms", "mean_ttft_ms"))
                vs = f"{pct(jct)}, {pct(ttft)}"
            if math.isfinite(floor):
                floor_cell, best = f"{floor:.0f}", pct(ratio(floor, v.get("mean_jct_ms")))
            else:
                floor_cell, best = "none: over capacity", "–"
            lines.append(f"| {wl} | {load}{mark} | {pt['rate']:.1f} | {floor_cell} | " + " | ".join(cells)
                         + f" | {best} | {vs} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(doc["workloads"])
    fig, axes = plt.subplots(1, len(wls), figsize=(5.5 * len(wls), 4), squeeze=False)
    for ax, wl in zip(axes[0], wls, strict=True):
        pts = doc["workloads"][wl]["loads"]
        xs = [float(k) for k in pts]
        floors = [p["floor"]["jct_floor_ms"] / 1000 for p in pts.values()]
        floors = [f if math.isfinite(f) else math.nan for f in floors]  # past capacity: no floor
        ax.plot(xs, floors, "k--", label="floor (any scheduler)")
        for name in next(iter(pts.values()))["systems"]:
            ax.plot(xs, [p["systems"][name]["mean_jct_ms"] / 1000 for p in pts.values()], "o-", label=name)
        ax.set_title(f"{wl}: steady-state mean JCT")
        ax.set_xlabel("load (× decode capacity)")
        ax.set_ylabel("mean JCT (s)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:  # pragma: no cover - CLI
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-headroom"))
    ap.add_argument("--profile", default="h100-llama-2-7b")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--workloads", default="LPHD,Mixed")
    ap.add_argument("--loads", default="0.3,0.6,0.9")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from bench.spec import split_systems  # "tetri+a=1,b=2" is one system

    doc = headroom(a.out, a.profile, a.instances, tuple(a.workloads.split(",")),
                   tuple(float(x) for x in a.loads.split(",")), tuple(split_systems(a.systems)), a.seed)  # fmt: skip
    print(markdown(doc))


if __name__ == "__main__":  # pragma: no cover
    main()
