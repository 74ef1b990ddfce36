"""What `tetri bench compare` and its relatives (live runs, A/B, headroom) share: the run's
specification, its workload and rate, the systems list and the ratios against a reference."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bench.metrics import ratio
from bench.sessions import build_session_workload, is_session_workload
from bench.workloads import Workload, build_workload

STANDARD_SYSTEMS = ("colocated-vllm", "colocated-sarathi", "disagg-simple", "tetri")
BASELINE = "colocated-vllm"
SUMMARY_KEYS = (
    "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms",
    "mean_jct_ms", "p50_jct_ms", "p99_jct_ms",
    "throughput_rps", "output_tokens_per_s", "instance_seconds", "busy_instance_seconds",
    "perf_per_instance_s", "completed", "errors", "makespan_s",
)  # fmt: skip


@dataclass
class CompareSpec:
    workloads: list[str]
    backend: str = "sim"
    profile: str = "h100-llama-2-7b"
    instances: int = 4
    requests: int = 500
    rate: str = "auto"
    load: float = 1.0
    seed: int = 0
    systems: list[str] = field(default_factory=lambda: list(STANDARD_SYSTEMS))
    network: str = "inter"
    kv_tokens: int | None = None
    length_scale: float = 1.0
    max_prompt: int | None = None
    max_output: int | None = None
    model: str = "smollm2-135m-instruct"
    live_backend: str = "native"
    title: str | None = None


def rate_value(spec: CompareSpec) -> float | None:
    r = (spec.rate or "auto").strip().lower()
    if r == "auto":
        return None
    if r in ("inf", "burst", "0"):
        return math.inf
    return float(r)


def load_workload(spec: CompareSpec, name: str, max_context: int | None) -> Workload:
    if is_session_workload(name):  # closed-loop sessions or shared system prompts (bench/sessions.py)
        swl = build_session_workload(name, spec.requests, seed=spec.seed, max_context=max_context)
        if spec.length_scale != 1.0 or spec.max_prompt or spec.max_output:
            swl.scaled(spec.length_scale, spec.max_prompt, spec.max_output)  # refuses, saying why
        return swl
    wl = build_workload(name, spec.requests, rate=None, seed=spec.seed, max_context=max_context)
    if spec.length_scale != 1.0 or spec.max_prompt or spec.max_output:
        wl = wl.scaled(spec.length_scale, spec.max_prompt, spec.max_output)
    return wl


def relative(wres: dict[str, Any], refs: tuple[str, ...] = (BASELINE, "colocated-sarathi")) -> None:
    systems = wres["systems"]
    for ref in refs:
        if ref not in systems:
            continue
        b = systems[ref]["summary"]
        for s in systems.values():
            rel = s.setdefault("relative", {})
            rel[f"vs_{ref}"] = {
                k: ratio(s["summary"].get(k), b.get(k))
                for k in ("mean_ttft_ms", "mean_jct_ms", "mean_tpot_ms", "p99_ttft_ms", "instance_seconds",
                          "busy_instance_seconds", "perf_per_instance_s")
            }  # fmt: skip



def split_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def split_systems(s: str) -> list[str]:
    """Comma-separated systems, where ``tetri+a=1,b=2`` is one system: an item with ``=`` but no ``+``
    continues the previous system's overrides."""
    out: list[str] = []
    for item in split_list(s):
        if out and "=" in item and "+" not in item and "+" in out[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return out
