"""The simulator's configuration (the systems: ``colocated-vllm``, vLLM-v0 style whole-prompt batches that
stall decodes; ``colocated-sarathi``, stall-free chunked batches; ``disagg-simple``, prefill/decode pools
with plain policies; ``tetri``, TetriInfer with this project's additions; see docs/reproduction.md).

The configuration: a ``SystemConfig`` is the engine, batching and planning knobs of one
simulated system plus its scheduling policy, a ``PolicyConfig`` (orchestrator/policies/config.py):
the very configuration the live control plane runs, so ``Settings.policy_config()`` simulates the
deployed system. The named systems (``SYSTEMS``) are overrides of the default (deployed) policy.

Options: ``system_config("base+key=value,...")`` (e.g. ``tetri+predictor=oracle,pd_ratio=1:3``); a
key is a ``SystemConfig`` or ``PolicyConfig`` field, or one of the simulator's shorthands:

* ``fallback=none|hphd|adaptive|backlog``: the co-located fallback, as two policy knobs
  (``colocate_heavy_heavy``; the backlog rule, ``colocate_backlog_tokens`` > 0);
* ``fallback_wait_s=S``: the backlog rule as seconds of prefill work at the knee (``backlog_wait_s``);
* ``admission`` (``decode_admission``), ``granularity`` (``predictor_granularity``);
* ``predictor=noisy`` (the learned predictor's stand-in, below) and ``predictor=none`` (``constant``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from orchestrator.policies.config import PolicyConfig

# The simulated layout planner's objectives (planner.py).
OBJECTIVES = ("balanced", "ttft", "jct", "slo")

# The baselines' scheduling: what a plain vLLM deployment behind a load balancer, or a disaggregated
# system without TetriInfer's policies, does.
_BASELINE = PolicyConfig(
    global_scheduler="least_loaded", prefill_policy="fcfs", late_binding="none", dispatch_policy="least_loaded",
    decode_admission="greedy", predictor="constant", colocate_heavy_heavy=False, colocate_backlog_tokens=0,
    colocate_pick="outstanding", flip_policy="none",
)  # fmt: skip

# Option shorthands -> the field they set.
_ALIASES = {
    "admission": "decode_admission",
    "granularity": "predictor_granularity",
    "fallback_wait_s": "backlog_wait_s",
}
_FALLBACKS = ("none", "hphd", "adaptive", "backlog")


@dataclass
class SystemConfig:
    name: str
    layout: str = "colocated"  # colocated | disaggregated
    batching: str = "vllm"  # co-located local scheduler: vllm | sarathi
    chunk_size: int | None = None  # None: the timing model's prefill knee
    max_num_seqs: int = 256
    max_batched_tokens: int = 4096  # vLLM whole-prompt batches
    watermark: float = 0.01
    flip_cost_s: float = 0.006  # how long an instance's role change takes
    # Prefix caching (prefix.py): engines reuse cached prompt blocks; placement sees their contents
    # exactly ("precise": engine events) or as what was routed where ("approx": no events).
    prefix_cache: bool = False
    prefix_index: str = "precise"
    # Co-located layout: prompts wait in the control plane's queue until their instance may take one
    # more (the core's release rule) and idle peers may take them (late binding): the live
    # orchestrator's co-located path. Off: a prompt enters its instance's engine on arrival (a plain
    # load balancer or the SGLang router in front of engines).
    hold_prompts: bool = False
    # Hybrid passes (Sarathi batching, decode hosts): cap the prefill tokens beside running decodes so
    # the pass takes at most this long (Sarathi-Serve derives it from the TBT SLO). None: the chunk.
    step_budget_ms: float | None = None
    # The scheduling policy: the live control plane's configuration (the default: the deployed defaults).
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # predictor=learned where the requests carry no prompt text: the oracle's bucket with this
    # accuracy, a miss landing on a neighbouring bucket (the classifier's usual error; 74.9% is the
    # paper's accuracy at granularity 200).
    learned_accuracy: float = 0.749
    # The backlog rule in seconds of prefill work at the knee's tokens/s (None: the policy's
    # colocate_backlog_tokens as it is): converted to colocate_backlog_tokens on the timing model.
    backlog_wait_s: float | None = None
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
        """Flat: the system's knobs and its policy's."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "policy"}
        return own | asdict(self.policy)

    def with_policy(self, **knobs: Any) -> SystemConfig:
        return replace(self, policy=replace(self.policy, **knobs))

    def backlog_tokens(self, prefill_tokens_per_s: float) -> int:
        """The backlog rule's threshold in prompt tokens: ``backlog_wait_s`` of prefill work at
        ``prefill_tokens_per_s`` (a prompt is co-located when the prefill pool holds more), or the
        policy's ``colocate_backlog_tokens``."""
        if self.backlog_wait_s is None:
            return self.policy.colocate_backlog_tokens
        # "more than T tokens" == "at least wait_s of work" for whole tokens: T = ceil(wait·tps) - 1.
        return max(1, math.ceil(self.backlog_wait_s * prefill_tokens_per_s) - 1)


SYSTEMS: dict[str, SystemConfig] = {
    "colocated-vllm": SystemConfig("colocated-vllm", layout="colocated", batching="vllm", policy=_BASELINE),
    "colocated-sarathi": SystemConfig("colocated-sarathi", layout="colocated", batching="sarathi", policy=_BASELINE),
    "disagg-simple": SystemConfig("disagg-simple", layout="disaggregated", policy=_BASELINE),
    # TetriInfer: the deployed defaults (power-of-two dispatch, reserve-dynamic admission, HPHD and the
    # backlog rule co-located on the least prefill-loaded decode instance, late binding) with the
    # paper's SJF prefill queue and idle flip, and a split chosen by simulating the candidates.
    "tetri": SystemConfig(
        "tetri",
        layout="disaggregated",
        policy=PolicyConfig(prefill_policy="sjf", flip_policy="idle", flip_idle_s=60.0, predictor="learned"),
        # Conditional disaggregation: any prompt the prefill pool would hold back > 30 ms while a decode
        # instance has room runs co-located on a decode instance (docs/reproduction.md).
        backlog_wait_s=0.03,
        layout_plan="simulated",
    ),
}


def system_config(name: str, **overrides: Any) -> SystemConfig:
    """A standard system by name, or ``base+key=value,key=value`` (e.g. ``tetri+predictor=oracle``);
    ``overrides`` (field=value) apply last."""
    base, _, opts = name.partition("+")
    if base not in SYSTEMS:
        raise ValueError(f"unknown system {base!r}; known: {', '.join(SYSTEMS)}")
    cfg = replace(SYSTEMS[base], name=name)
    items: list[tuple[str, Any]] = []
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        items.append((k.strip().replace("-", "_"), v.strip()))
    for k, v in [*items, *((k, _Given(v)) for k, v in overrides.items())]:
        cfg = _apply(cfg, k, v)
    return check_config(cfg)


class _Given:
    """A value given as a Python object (an override), not parsed from an option string."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _apply(cfg: SystemConfig, key: str, raw: Any) -> SystemConfig:
    key = _ALIASES.get(key, key)
    if key == "fallback":
        return _fallback(cfg, _value(raw, "none"))
    if key == "predictor" and _value(raw, "") in ("noisy", "none"):
        return cfg.with_policy(predictor="learned" if _value(raw, "") == "noisy" else "constant")
    if key in {f.name for f in fields(SystemConfig)} - {"name", "policy"}:
        return replace(cfg, **{key: _value(raw, getattr(cfg, key))})
    if key in PolicyConfig.names():
        return cfg.with_policy(**{key: _value(raw, getattr(cfg.policy, key))})
    raise ValueError(f"unknown system option {key!r}")


def _value(raw: Any, current: Any) -> Any:
    """An option's value, typed like the field's current value."""
    if isinstance(raw, _Given):
        return raw.value
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"not a boolean: {raw!r}")
        return raw.lower() in ("true", "1", "yes")
    if current is not None:
        return type(current)(raw)
    return _auto(raw)


def _fallback(cfg: SystemConfig, mode: str) -> SystemConfig:
    """The simulator's shorthand for the co-located fallback: HPHD (``hphd``), the backlog rule
    (``backlog``), both (``adaptive``) or neither (``none``). The backlog rule keeps the system's
    threshold, or 100 ms of prefill work where it has none."""
    if mode not in _FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(_FALLBACKS)}, not {mode!r}")
    backlog = mode in ("adaptive", "backlog")
    has_rule = cfg.backlog_wait_s is not None or cfg.policy.colocate_backlog_tokens > 0
    wait = (cfg.backlog_wait_s if has_rule else 0.1) if backlog else None
    tokens = cfg.policy.colocate_backlog_tokens if backlog else 0
    cfg = replace(cfg, backlog_wait_s=wait)
    return cfg.with_policy(colocate_heavy_heavy=mode in ("hphd", "adaptive"), colocate_backlog_tokens=tokens)


def check_config(cfg: SystemConfig) -> SystemConfig:
    """``cfg``, once every option with a fixed set of values has one of them (ValueError naming the
    option otherwise), so that a bad one is named before anything runs. The policy's knobs are
    checked when the PolicyConfig is built."""
    for key, allowed in _CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}, not {getattr(cfg, key)!r}")
    return cfg


_CHOICES: dict[str, tuple[str, ...]] = {
    "layout": ("colocated", "disaggregated"), "batching": ("vllm", "sarathi"),
    "layout_plan": ("work_share", "simulated"), "plan_objective": OBJECTIVES, "ttft_at": ("prefill", "handoff"),
    "plan_late_binding": ("fixed", "choose"), "prefix_index": ("precise", "approx"),
}  # fmt: skip


def _auto(v: str) -> Any:
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


def deployed_system(policy: PolicyConfig, name: str = "deployed", **knobs: Any) -> SystemConfig:
    """The system a deployment runs, for the simulator and the pool planner: its scheduling policy
    (``Settings.policy_config()``) on P/D pools whose split is planned by simulation, decode
    instances batching stall-free. ``knobs``: other SystemConfig fields (plan objective, SLOs)."""
    layout = "colocated" if policy.mode == "colocated" else "disaggregated"
    cfg = SystemConfig(name, layout=layout, batching="sarathi", policy=policy, layout_plan="simulated")
    return check_config(replace(cfg, **knobs))
