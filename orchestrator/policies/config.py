"""One policy configuration: every scheduling knob the live control plane and the simulator both read.

The deployment's ``Settings.policy_config()`` builds it (the defaults below are the live defaults),
the placement core and the policy factories read it, and the simulator's systems are named
overrides of it (orchestrator/sim/config.py), so the pool planner can simulate the system that is
actually deployed. A knob that selects a policy accepts the names registered for it
(orchestrator/policies/registry.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from orchestrator.policies import registry, tpot  # tpot adds its TPOT-aware pickers to HOST_PICKERS
from orchestrator.policies.hosts import HOST_PICKERS

# The co-located host pickers live in hosts.py as a table; register them under their knob here.
assert "light_first" in HOST_PICKERS and tpot.TPOT_PICKERS
for _name, _key in HOST_PICKERS.items():
    registry.register("colocate_pick", _name)(_key)

MODES = ("auto", "colocated", "disaggregated")

# Knob -> the registry's name for the policies it selects (most are the same).
POLICY_KNOBS: dict[str, str] = {
    "prefill_policy": "prefill_policy",
    "global_scheduler": "global_scheduler",
    "late_binding": "late_binding",
    "dispatch_policy": "dispatch_policy",
    "dispatch_fallback": "dispatch_fallback",
    "dispatch_ratio_objective": "dispatch_ratio_objective",
    "decode_admission": "decode_admission",
    "predictor": "predictor",
    "colocate_pick": "colocate_pick",
    "flip_policy": "flip_policy",
}


@dataclass(frozen=True)
class PolicyConfig:
    # Where requests run: auto (disaggregate where a P/D pair exists), colocated, disaggregated.
    mode: str = "auto"
    # Level 1: the global scheduler and the per-instance prefill queues.
    global_scheduler: str = "prefix_aware"
    prefix_cache_weight: float = 4.0
    prefix_running_weight: float = 16.0
    prefix_cache_threshold: float = 0.3
    prefix_balance_abs: int = 64
    prefix_balance_rel: float = 1.5
    prefill_policy: str = "fcfs"
    prefill_sched_batch: int = 16
    prefill_engine_backlog: int = 2
    # An instance with room and an empty queue takes the next prompt queued for its busiest peer.
    late_binding: str = "busiest"
    # Level 2: the decode dispatcher and admission.
    dispatch_policy: str = "power_of_two"
    power_of_d: int = 2
    dispatch_fallback: str = "most_free"
    dispatch_ratio_objective: str = "balance"
    decode_admission: str = "reserve_dynamic"
    # A decode instance also refuses new requests while it runs this many (0: no cap): a batch cap
    # from the TPOT SLO (orchestrator/policies/tpot.py); it gates co-located hosts' admission too.
    decode_max_running: int = 0
    # The length predictor and what counts as heavy.
    predictor: str = "learned"
    predictor_granularity: int = 200
    heavy_decode_threshold: int = 128
    heavy_prefill_threshold: int = 512
    # Conditional disaggregation: HPHD co-located; co-located on a decode instance when there is no
    # colocated pool; co-located while the prefill pool holds more than colocate_backlog_tokens
    # prompt tokens (0: off); the decode instance such a request runs on.
    colocate_heavy_heavy: bool = True
    colocate_on_decode: bool = True
    colocate_backlog_tokens: int = 1200
    colocate_pick: str = "prefill_load"
    # TPOT-aware isolation (orchestrator/policies/tpot.py): co-located requests whose predicted
    # output x context is at least this many KV token-steps run on the first tpot_isolate_share of
    # the hosts, the rest on the others (0: off).
    tpot_isolate_weight: int = 0
    tpot_isolate_share: float = 0.25
    # Instance flips between the prefill and decode pools.
    flip_policy: str = "none"
    flip_idle_s: float = 60.0
    flip_min_per_role: int = 1
    flip_cooldown_s: float | None = None
    flip_load_kv_threshold: float = 0.8

    def __post_init__(self) -> None:
        for knob, reg in POLICY_KNOBS.items():
            registry.check(reg, getattr(self, knob))
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.tpot_isolate_weight < 0 or not 0 < self.tpot_isolate_share < 1:
            raise ValueError("tpot_isolate_weight must be >= 0 and tpot_isolate_share in (0, 1)")
        if self.decode_max_running < 0:
            raise ValueError(f"decode_max_running must be >= 0, got {self.decode_max_running}")
        if self.colocate_backlog_tokens < 0:
            raise ValueError(f"colocate_backlog_tokens must be >= 0, got {self.colocate_backlog_tokens}")

    def with_(self, **overrides: Any) -> PolicyConfig:
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_source(cls, source: Any) -> PolicyConfig:
        """The knobs of any object that has them as attributes (``Settings``)."""
        return cls(**{name: getattr(source, name) for name in cls.names()})
