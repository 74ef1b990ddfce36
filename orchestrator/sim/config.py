"""The simulator's configuration: ``SystemConfig`` (engine, batching and policy knobs of one simulated
system), the named systems (``SYSTEMS``) and the option syntax ``base+key=value,...``
(``system_config``). See orchestrator/sim/loop.py for what each system does."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from orchestrator.policies import POLICY_NAMES
from orchestrator.policies.flip import FLIP_POLICY_NAMES

# The simulated layout planner's objectives (planner.py).
OBJECTIVES = ("balanced", "ttft", "jct", "slo")


@dataclass
class SystemConfig:
    name: str
    layout: str = "colocated"  # colocated | disaggregated
    batching: str = "vllm"  # co-located local scheduler: vllm | sarathi
    chunk_size: int | None = None  # None: the timing model's prefill knee
    max_num_seqs: int = 256
    max_batched_tokens: int = 4096  # vLLM whole-prompt batches
    watermark: float = 0.01
    prefill_policy: str = "fcfs"
    prefill_sched_batch: int = 16
    dispatch_policy: str = "least_loaded"
    power_of_d: int = 2
    admission: str = "greedy"
    flip_policy: str = "none"
    flip_idle_s: float = 60.0
    flip_cost_s: float = 0.006
    predictor: str = "none"  # none | oracle | noisy
    predictor_accuracy: float = 0.749
    granularity: int = 200
    heavy_decode_threshold: int = 128
    heavy_prefill_threshold: int = 512
    # none | hphd | adaptive (hphd + co-locate while the prefill pool is backlogged) | backlog (the
    # backlog rule only: HPHD is disaggregated like the rest, and the layout planner decides whether
    # there is a prefill pool at all) | all
    fallback: str = "none"
    # Which instance a co-located request goes to: "outstanding" (fewest requests: a plain load
    # balancer, as in front of vLLM) or "prefill_load" (fewest prompt tokens waiting or prefilling,
    # then fewest requests: the global scheduler's least-loaded rule, applied to co-located hosts)
    colocate_pick: str = "outstanding"
    # Late binding (orchestrator/policies/late_binding.py): an instance with room and nothing queued
    # takes the next prompt queued for its busiest peer of the same pool: none | busiest
    late_binding: str = "none"
    fallback_wait_s: float = 0.1  # adaptive: co-locate when the prefill queue would delay a prompt longer
    pd_ratio: str = "auto"  # auto (planned: layout_plan) | "P:D"
    layout_plan: str = "work_share"  # work_share (analytic) | simulated (candidates simulated: planner.py)
    plan_objective: str = "balanced"  # simulated plan: balanced (TTFT x JCT) | ttft | jct | slo
    plan_ttft_slo_ms: float = 200.0  # slo: the p99 TTFT a layout must meet; the least mean JCT among those
    # slo, in full: a layout meets it when plan_slo_share of its requests meet both plan_ttft_slo_ms and
    # plan_tpot_slo_ms (planner.slo_attainment, what `tetri bench goodput` measures); the defaults (TPOT
    # unbounded, 99%) are the p99 TTFT rule
    plan_tpot_slo_ms: float = float("inf")
    plan_slo_share: float = 0.99
    # simulated plan: "fixed" (every candidate runs the system's late_binding) or "choose" (each split is
    # simulated with it and without it, and the best by the objective is kept, late binding included)
    plan_late_binding: str = "fixed"
    # simulated plan: the resample of the traffic spans plan_horizon_s at the workload's rate, within bounds
    plan_horizon_s: float = 60.0
    plan_min_requests: int = 1000
    plan_max_requests: int = 16000
    # When a disaggregated request's first token reaches the client: "prefill" (sampled on the prefill
    # instance: the paper's TTFT) or "handoff" (after the KV transfer: the live native path, SGLang, Dynamo)
    ttft_at: str = "prefill"
    monitor_interval_s: float = 0.1
    retry_interval_s: float = 0.02

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SYSTEMS: dict[str, SystemConfig] = {
    "colocated-vllm": SystemConfig("colocated-vllm", layout="colocated", batching="vllm"),
    "colocated-sarathi": SystemConfig("colocated-sarathi", layout="colocated", batching="sarathi"),
    "disagg-simple": SystemConfig(
        "disagg-simple",
        layout="disaggregated",
        prefill_policy="fcfs",
        dispatch_policy="least_loaded",
        admission="greedy",
        predictor="none",
    ),
    "tetri": SystemConfig(
        "tetri",
        layout="disaggregated",
        prefill_policy="sjf",
        dispatch_policy="power_of_two",
        admission="reserve_dynamic",
        flip_policy="idle",
        flip_idle_s=60.0,
        predictor="noisy",
        # Conditional disaggregation: HPHD, and any prompt the prefill pool would hold back > 30 ms
        # while a decode instance has room, runs co-located on a decode instance (docs/reproduction.md).
        fallback="adaptive",
        fallback_wait_s=0.03,
        # The split, no prefill pool included, chosen by simulating the candidates (planner.py).
        layout_plan="simulated",
        colocate_pick="prefill_load",
        # A queued prompt is not bound until its engine starts it: an idle peer takes it first.
        late_binding="busiest",
    ),
}


def system_config(name: str, **overrides: Any) -> SystemConfig:
    """A standard system by name, or ``base+key=value,key=value`` (e.g. ``tetri+predictor=oracle``)."""
    base, _, opts = name.partition("+")
    if base not in SYSTEMS:
        raise ValueError(f"unknown system {base!r}; known: {', '.join(SYSTEMS)}")
    cfg = replace(SYSTEMS[base], name=name)
    kv: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        k = k.strip().replace("-", "_")
        if not hasattr(cfg, k):
            raise ValueError(f"unknown system option {k!r}")
        cur = getattr(cfg, k)
        kv[k] = type(cur)(v) if cur is not None and not isinstance(cur, bool) else _auto(v)
    kv.update(overrides)
    return check_config(replace(cfg, **kv))


def check_config(cfg: SystemConfig) -> SystemConfig:
    """``cfg``, once every option with a fixed set of values has one of them (ValueError naming the
    option otherwise), so that a bad one is named before anything runs."""
    for key, allowed in _choices().items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}, not {getattr(cfg, key)!r}")
    return cfg


def _choices() -> dict[str, tuple[str, ...]]:
    return {
        "layout": ("colocated", "disaggregated"), "batching": ("vllm", "sarathi"),
        "prefill_policy": POLICY_NAMES["prefill_policy"], "dispatch_policy": POLICY_NAMES["dispatch_policy"],
        "admission": POLICY_NAMES["decode_admission"], "flip_policy": FLIP_POLICY_NAMES,
        "predictor": ("none", "oracle", "noisy"), "fallback": ("none", "hphd", "adaptive", "backlog", "all"),
        "colocate_pick": ("outstanding", "prefill_load"), "late_binding": POLICY_NAMES["late_binding"],
        "layout_plan": ("work_share", "simulated"), "plan_objective": OBJECTIVES, "ttft_at": ("prefill", "handoff"),
        "plan_late_binding": ("fixed", "choose"),
    }  # fmt: skip


def _auto(v: str) -> Any:
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v
