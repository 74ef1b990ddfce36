"""Benchmark of the built-in engine on this machine, printed as Markdown (docs/benchmarks.md).

    python -m backends.engines.native.bench_engine [--model smollm2-135m-instruct] [--device cpu]

1. Prefill tokens/s against tokens per forward pass (the full sweep, no early stop) and the knee.
2. Decode tokens/s against batch size (every request `--context` tokens deep).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from backends.engines.native.engine import NativeEngine
from backends.engines.native.model_source import DEFAULT_MODEL
from backends.engines.native.profile import DEFAULT_SIZES, decode_throughput, device_name, profile_knee


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="prefill sweeps; each size keeps its best")
    ap.add_argument("--no-save", action="store_true", help="do not cache the measured knee")
    args = ap.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    engine = NativeEngine(
        args.model,
        chunk_size=max(sizes),
        kv_tokens=max(max(sizes), max(batches) * (args.context + args.steps + 16)) + 1024,
        max_batch=max(batches),
        device=args.device,
        dtype=args.dtype,
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"model `{engine.model_name}`, {engine.dtype}, device {device_name(engine.device)}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} intra-op threads, "
        f"{platform.system()}; 1-min load average at start {load:.1f}\n"
    )
    t0 = time.perf_counter()
    result = profile_knee(
        engine,
        sizes,
        save=not args.no_save,
        early_stop=False,
        rounds=args.rounds,
    )
    peak = result.peak_tokens_per_s
    print("| tokens per forward pass | prefill tokens/s | % of peak |")
    print("|---:|---:|---:|")
    for n, tps in result.curve:
        mark = " **knee**" if n == result.knee else ""
        print(f"| {n}{mark} | {tps:,.0f} | {100 * tps / peak:.0f}% |")
    print(f"\nknee: **{result.knee}** tokens per pass (prefill sweep {time.perf_counter() - t0:.0f} s)\n")

    rows = decode_throughput(engine, batch_sizes=batches, context=args.context, steps=args.steps)
    base = rows[0][1] if rows else 1.0
    print("| decode batch size | decode tokens/s | ms per step (best) | ms per step (median) | vs batch 1 |")
    print("|---:|---:|---:|---:|---:|")
    for b, tps, ms, med in rows:
        print(f"| {b} | {tps:,.1f} | {ms:,.1f} | {med:,.1f} | {tps / base:.1f}x |")
    print(
        f"\n(context {args.context} tokens per request; best of {args.steps} timed decode steps per "
        f"batch size; prefill: best pass per size over {args.rounds} sweeps)"
    )


if __name__ == "__main__":
    main()
