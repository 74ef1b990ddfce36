"""TetriInfer scheduling policies: pure objects over InstanceView/RequestView, clock (``now``) and
randomness (``rng``) injected, no I/O. The live control plane (orchestrator/placement.py, app.py)
and the simulator (orchestrator/sim) run the very same objects. See docs/scheduling.md."""

from __future__ import annotations

from orchestrator.policies.admission import ADMISSION_POLICY_NAMES, DecodeAdmission, make_admission
from orchestrator.policies.capacity import available_kv, fits
from orchestrator.policies.dispatch import (
    DISPATCH_FALLBACK_NAMES,
    DISPATCH_POLICY_NAMES,
    RATIO_OBJECTIVE_NAMES,
    Dispatcher,
    make_dispatcher,
    split_alpha_beta,
)
from orchestrator.policies.flip import FLIP_POLICY_NAMES, FLIP_SCOPE_NAMES, FlipPolicy, make_flip_policy
from orchestrator.policies.global_scheduler import GLOBAL_SCHEDULER_NAMES, LeastLoadedPrefill, make_global_scheduler
from orchestrator.policies.late_binding import LATE_BINDING_NAMES, LateBinding, make_late_binding
from orchestrator.policies.predictors import (
    PREDICTOR_NAMES,
    ConstantPredictor,
    LengthPredictor,
    OraclePredictor,
    make_predictor,
)
from orchestrator.policies.prefill_queue import PREFILL_POLICY_NAMES, PrefillQueue, make_prefill_queue
from orchestrator.policies.types import ClusterView, FlipDecision, InstanceView, RequestView

# Configuration knob (a field of orchestrator/config.py Settings) -> the names it accepts.
POLICY_NAMES: dict[str, tuple[str, ...]] = {
    "prefill_policy": PREFILL_POLICY_NAMES,
    "dispatch_policy": DISPATCH_POLICY_NAMES,
    "decode_admission": ADMISSION_POLICY_NAMES,
    "flip_policy": FLIP_POLICY_NAMES,
    "predictor": PREDICTOR_NAMES,
    "late_binding": LATE_BINDING_NAMES,
}

# Choices the policies expose that Settings does not have (yet): knob -> names. Their defaults are
# the factories' defaults; see docs/scheduling.md.
EXTRA_POLICY_NAMES: dict[str, tuple[str, ...]] = {
    "global_scheduler": GLOBAL_SCHEDULER_NAMES,
    "dispatch_fallback": DISPATCH_FALLBACK_NAMES,
    "dispatch_ratio_objective": RATIO_OBJECTIVE_NAMES,
    "flip_scope": FLIP_SCOPE_NAMES,
}

__all__ = [
    "EXTRA_POLICY_NAMES",
    "POLICY_NAMES",
    "ClusterView",
    "ConstantPredictor",
    "DecodeAdmission",
    "Dispatcher",
    "FlipDecision",
    "FlipPolicy",
    "InstanceView",
    "LateBinding",
    "LeastLoadedPrefill",
    "LengthPredictor",
    "OraclePredictor",
    "PrefillQueue",
    "RequestView",
    "available_kv",
    "fits",
    "make_admission",
    "make_dispatcher",
    "make_flip_policy",
    "make_global_scheduler",
    "make_late_binding",
    "make_predictor",
    "make_prefill_queue",
    "split_alpha_beta",
]
