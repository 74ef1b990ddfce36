"""The cluster simulator: the live orchestrator's policies (orchestrator/policies) over simulated
engine instances whose passes take a calibrated timing model's time.

* config.py: a system's knobs (``SystemConfig``), the named systems (``SYSTEMS``), option parsing;
* state.py: per-request and per-instance state, the result of a run;
* batching.py: what an instance runs in its next pass (vLLM, Sarathi, chunked prefill);
* placement.py: every cluster-level decision (route, hosts, dispatch, late-binding steals);
* loop.py: the event loop (``ClusterSim``);
* split.py, planner.py, capacity.py: the prefill/decode split (analytic, simulated), decode capacity.
"""

from __future__ import annotations

from orchestrator.sim.config import SYSTEMS, SystemConfig, system_config
from orchestrator.sim.loop import ClusterSim
from orchestrator.sim.planner import simulate
from orchestrator.sim.state import SimResult

__all__ = ["SYSTEMS", "ClusterSim", "SimResult", "SystemConfig", "simulate", "system_config"]
