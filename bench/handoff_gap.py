"""How much earlier the first token leaves a native prefill worker than its KV hand-off ends.

``python -m bench.handoff_gap [--model M] [--prompts 64,300,1000] [--repeats 8]`` starts one prefill
and one decode worker, calls the streamed ``/prefill`` and times, per request, the gap between its
first line (the first token, relayed to the client at once) and its second (the KV pushed and
imported on the decode worker): the TTFT the early first token saves over waiting for the hand-off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from orchestrator.launcher import Fleet


def measure(prefill_url: str, decode_url: str, prompt_len: int, repeats: int) -> dict[str, float]:
    gaps, totals, nbytes = [], [], 0
    for i in range(repeats):
        rid = f"gap-{prompt_len}-{i}"
        body = {"request_id": rid, "prompt_ids": [100 + (i * 7 + k * 13) % 40000 for k in range(prompt_len)],
                "sampling": {"temperature": 0, "max_tokens": 2, "ignore_eos": True},
                "handoff": {"decode_url": decode_url, "lease_s": 2}, "stream": True}
        started = time.perf_counter()
        first_at = kv_at = 0.0
        with httpx.stream("POST", f"{prefill_url}/prefill", json=body, timeout=300) as resp:
            for line in resp.iter_lines():
                if not line:
                    continue
                obj = json.loads(line)
                if "first" in obj:
                    first_at = time.perf_counter()
                if obj.get("kv"):
                    kv_at, nbytes = time.perf_counter(), obj["kv"]["nbytes"]
        gaps.append(1000 * (kv_at - first_at))
        totals.append(1000 * (kv_at - started))
        httpx.post(f"{decode_url}/abort", json={"request_id": rid}, timeout=10)  # free the leased KV
    return {"prompt_tokens": prompt_len, "kv_mb": nbytes / 1e6, "gap_ms_median": statistics.median(gaps),
            "gap_ms_min": min(gaps), "gap_ms_max": max(gaps), "prefill_and_push_ms_median": statistics.median(totals)}


def main() -> None:  # pragma: no cover - CLI
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", default="64,300,1000")
    ap.add_argument("--repeats", type=int, default=8)
    a = ap.parse_args()
    fleet = Fleet()
    try:
        p = fleet.start_worker("prefill", a.model)
        d = fleet.start_worker("decode", a.model)
        fleet.wait_healthy(timeout_s=600)
        print("| prompt tokens | KV MB | first token earlier by (median, min–max) ms | prefill + push ms | share |")
        print("|---:|---:|---:|---:|---:|")
        for n in (int(x) for x in a.prompts.split(",")):
            r = measure(p.url, d.url, n, a.repeats)
            share = r["gap_ms_median"] / r["prefill_and_push_ms_median"]
            spread = f"{r['gap_ms_min']:.1f}–{r['gap_ms_max']:.1f}"
            print(f"| {n} | {r['kv_mb']:.1f} | {r['gap_ms_median']:.1f} ({spread}) | "
                  f"{r['prefill_and_push_ms_median']:.0f} | {share:.1%} |", flush=True)
    finally:
        fleet.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
