"""The length predictor's scheduling value: how much of the oracle's mean-JCT gain over a constant
predictor the shipped learned model keeps, in the simulator (issue 17).

For each workload and seed, the same requests (ShareGPT prompts, with their texts) run three times
on the same system, changing only ``predictor``: ``constant`` (bucket 0: no length information),
``oracle`` (the true bucket) and ``learned`` (predictor/artifacts run on the prompt texts). The
value is ``(JCT_constant - JCT_learned) / (JCT_constant - JCT_oracle)``: 1 = as good as knowing the
answer's length, 0 = no better than not predicting. ``--held-out`` draws only prompts of the
predictor's test split (conversations it never trained on).

    python -m bench.predictor_value --workloads Mixed,LPHD --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from typing import Any

from backends.engines.simulated.profiles import get_timing
from bench.sharegpt import prompt_text
from bench.workloads import build_workload, sharegpt_pool
from orchestrator.sim import simulate, system_config
from orchestrator.sim.capacity import capacity_rate

PREDICTORS = ("constant", "oracle", "learned")


def measure(
    workload: str,
    system: str,
    profile: str,
    instances: int,
    requests: int,
    load: float,
    seed: int,
    held_out: bool,
    kv_tokens: int | None = None,
) -> dict[str, Any]:
    tm = get_timing(profile, kv_tokens=kv_tokens)
    pool = None
    if held_out:
        from predictor.data import split_of

        pool = [p for p in sharegpt_pool(4096) if p.id is not None and split_of(p.id) == "test"]
    base = build_workload(workload, requests, rate=None, seed=seed, pool=pool)
    prompts = [r.prompt_tokens for r in base.requests]
    outputs = [r.output_tokens for r in base.requests]
    rate = load * capacity_rate(tm, prompts, outputs, instances)
    wl = base.with_arrivals(rate, seed + 1)
    # The texts ride on the requests: the simulator's learned predictor reads `prompt`.
    reqs = [replace(r, prompt=prompt_text(r.source_index)) for r in wl.requests if r.source_index is not None]
    out: dict[str, Any] = {"workload": workload, "seed": seed, "kv_tokens": kv_tokens, "rate": rate,
                           "requests": len(reqs)}  # fmt: skip
    for name in PREDICTORS:
        opts = f"{system}{',' if '+' in system else '+'}predictor={name}"
        res = simulate(system_config(opts), tm, instances, reqs, seed=seed)
        done = [r for r in res.requests if r["jct_s"] is not None]
        out[name] = {
            "mean_jct_s": statistics.fmean(r["jct_s"] for r in done),
            "mean_ttft_s": statistics.fmean(r["ttft_s"] for r in done),
            "finished": len(done),
            "predicted_by": res.extra["predicted_by"],
            "split": res.split,
        }
    gain = out["constant"]["mean_jct_s"] - out["oracle"]["mean_jct_s"]
    kept = out["constant"]["mean_jct_s"] - out["learned"]["mean_jct_s"]
    out["oracle_gain_s"] = gain
    out["learned_share"] = kept / gain if gain > 0 else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="Mixed,LPHD")
    ap.add_argument("--system", default="tetri")
    ap.add_argument("--profile", default="h100-llama-2-7b")
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--load", type=float, default=0.9, help="rate as a share of the decode capacity")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kv-tokens", default="profile,12000", help="KV regimes: tokens per instance or 'profile'")
    ap.add_argument("--held-out", action="store_true", help="only prompts of the predictor's test split")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    rows = []
    t0 = time.perf_counter()
    regimes = [None if k == "profile" else int(k) for k in a.kv_tokens.split(",")]
    for wl, kv, seed in ((w, k, int(s)) for w in a.workloads.split(",") for k in regimes for s in a.seeds.split(",")):
        row = measure(wl, a.system, a.profile, a.instances, a.requests, a.load, seed, a.held_out, kv)
        rows.append(row)
        share = row["learned_share"]
        print(
            f"{wl} KV {kv or 'profile'} seed {seed}: rate {row['rate']:.1f}/s, mean JCT s constant "
            f"{row['constant']['mean_jct_s']:.3f} oracle {row['oracle']['mean_jct_s']:.3f} learned "
            f"{row['learned']['mean_jct_s']:.3f} ({row['learned']['predicted_by']}); learned keeps "
            + (f"{share:.0%}" if share is not None else "n/a (the oracle gains nothing)")
            + " of the oracle's gain",
            flush=True,
        )
    print(f"{time.perf_counter() - t0:.0f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
