"""How a disaggregated system divides its instances between prefill and decode.

Two planners, both from the workload's rate and lengths (what an operator sizing the pools knows):

* ``plan_split``: analytic. Prefill work at the knee's tokens/s, decode work at the batch the KV
  pool sustains; the split that keeps both pools below their target utilisation.
* ``plan_layout``: simulated. The analytic split is a good first guess but blind to queueing and
  back-pressure: a decode pool past its capacity stops taking prefilled KV, the prefill pool fills
  and TTFT explodes, where the same instances all co-located (stall-free hybrid batches) would have
  kept up. So it simulates the candidates (the analytic split, its neighbours and no prefill pool at
  all) on a resample of the traffic and keeps the best by the objective (``plan_objective``):
  ``balanced`` (the product of mean TTFT and mean JCT: equal weight to their relative changes),
  ``ttft``, ``jct``, or ``slo``: the least mean JCT among the candidates whose SLO attainment
  (``slo_attainment``: the share of requests whose TTFT meets ``plan_ttft_slo_ms`` and whose TPOT
  meets ``plan_tpot_slo_ms``, the definition ``tetri bench goodput`` measures) is at least
  ``plan_slo_share`` (as an SLO-driven planner, e.g. NVIDIA Dynamo's, sizes pools to its targets),
  or the highest attainment (then the least p99 TTFT) when none does. The defaults, no TPOT target
  and 99%, are a p99 TTFT target. A finite resample cannot see a decode pool that
  falls behind slowly (its backlog grows by a few percent a minute), so a candidate with a pool
  over its steady-state capacity (decode: ``capacity.decode_floor``; prefill: its work at the
  knee's tokens/s) is dropped while another can keep up; when none can, the one that falls behind
  slowest (least utilised) is chosen.

The resample has the workload's length mix and rate but its own draws and arrival times, so the
planner does not see the run it plans for, as a live planner would only see recent traffic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from backends.engines.simulated.timing import TimingModel
from orchestrator.sim.config import OBJECTIVES, SystemConfig, system_config
from orchestrator.sim.loop import ClusterSim
from orchestrator.sim.split import LayoutChoice, colocated_by_rule, layout_utilisation, plan_split, slo_attainment
from orchestrator.sim.state import SimResult


@dataclass(frozen=True)
class _SampleRequest:
    id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int


def planning_sample(
    prompts: Sequence[int], outputs: Sequence[int], rate: float, size: int, seed: int
) -> list[_SampleRequest]:
    """`size` (prompt, output) pairs drawn with replacement, Poisson arrivals at `rate`."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(size):
        k = rng.randrange(len(prompts))
        out.append(_SampleRequest(f"plan{i}", t, int(prompts[k]), int(outputs[k])))
        t += rng.expovariate(rate)
    return out


def _rank(objective: str, ttft: float, p99_ttft: float, jct: float, attained: float,
          share: float) -> tuple[int, float, float]:  # fmt: skip
    """(tier, score, tie-break), least first: a candidate whose SLO attainment is under ``share``
    ranks after every one that meets it, and among those by its attainment, then its p99 TTFT."""
    if objective == "ttft":
        return 0, ttft, 0.0
    if objective == "jct":
        return 0, jct, 0.0
    if objective == "slo":
        return (0, jct, 0.0) if attained >= share else (1, 1.0 - attained, p99_ttft)
    return 0, math.log(max(ttft, 1e-9)) + math.log(max(jct, 1e-9)), 0.0


def plan_layout(
    n: int,
    prompts: Sequence[int],
    outputs: Sequence[int],
    timing: TimingModel,
    cfg: SystemConfig,
    first_guess: int,
    rate: float,
    seed: int = 0,
    allow_no_prefill: bool = True,
    colocated_mask: Sequence[bool] | None = None,
) -> LayoutChoice:
    """Simulate the candidate splits on a resample of the traffic; keep the best by the objective.
    Candidates: the analytic split ``first_guess`` and its neighbours, and P = 0 (every request
    co-located on the decode instances, in stall-free hybrid batches) unless ``allow_no_prefill`` is
    False (decode engines that cannot run whole requests). ``colocated_mask`` marks the requests the
    fallback prefills on decode instances even when there is a prefill pool. Candidates with a pool
    that cannot sustain the rate are dropped while any candidate can; when none can, the least
    overloaded one is kept."""
    if cfg.plan_objective not in OBJECTIVES:
        raise ValueError(f"plan_objective must be one of {', '.join(OBJECTIVES)}, not {cfg.plan_objective!r}")
    size = max(cfg.plan_min_requests, min(cfg.plan_max_requests, int(rate * cfg.plan_horizon_s)))
    sample = planning_sample(prompts, outputs, rate, size, seed + 4243)
    warm = sample[len(sample) // 2].arrival  # scored on the second half: past the start-up transient
    lowest = 0 if allow_no_prefill else 1
    cands = sorted({lowest, first_guess - 1, first_guess, first_guess + 1} & set(range(lowest, n)))
    utils = {p: layout_utilisation(p, n, prompts, outputs, timing, cfg, rate, colocated_mask) for p in cands}
    keep = [p for p in cands if utils[p] < 1.0]
    if not keep:  # no layout keeps up: the one that falls behind slowest, whatever a short resample says
        keep = [p for p in cands if utils[p] <= min(utils.values()) * (1 + 1e-9)]
    rejected = {f"{p}:{n - p}": utils[p] for p in cands if p not in keep}
    cands = keep
    scores: dict[str, dict[str, float]] = {}
    best: tuple[tuple[int, float, float], int, str] | None = None
    bindings = [cfg.policy.late_binding]
    if cfg.plan_late_binding == "choose" and cfg.policy.late_binding != "none":
        bindings.append("none")
    for p, lb in ((p, lb) for p in cands for lb in bindings):
        key = f"{p}:{n - p}" + (f" late_binding={lb}" if lb != cfg.policy.late_binding else "")
        sub = replace(cfg, pd_ratio=f"{p}:{n - p}", layout_plan="work_share").with_policy(late_binding=lb)
        res = ClusterSim(sub, timing, n, sample, seed=seed).run()
        done = [r for r in res.requests if r["jct_s"] is not None and r["arrival"] >= warm]
        if not done:
            continue
        ttft = 1000.0 * sum(r["ttft_s"] for r in done) / len(done)
        p99 = 1000.0 * sorted(r["ttft_s"] for r in done)[int(0.99 * (len(done) - 1))]
        jct = 1000.0 * sum(r["jct_s"] for r in done) / len(done)
        attained = slo_attainment(done, cfg.plan_ttft_slo_ms, cfg.plan_tpot_slo_ms)
        rank = _rank(cfg.plan_objective, ttft, p99, jct, attained, cfg.plan_slo_share)
        scores[key] = {"mean_ttft_ms": ttft, "p99_ttft_ms": p99, "mean_jct_ms": jct, "score": rank[1],
                       "util": utils[p]}  # fmt: skip
        if cfg.plan_objective == "slo":
            scores[key]["meets_slo"] = rank[0] == 0
            scores[key]["slo_attainment"] = attained
        if best is None or rank < best[0]:
            best = (rank, p, lb)
    p = best[1] if best is not None else first_guess
    chosen = best[2] if best is not None and len(bindings) > 1 else None
    return LayoutChoice(p, n - p, cfg.plan_objective, scores, rejected, chosen)


def recommend_split(
    instances: int,
    prompts: Sequence[int],
    outputs: Sequence[int],
    rate: float,
    timing: TimingModel,
    cfg: SystemConfig,
    seed: int = 0,
    allow_no_prefill: bool = True,
) -> LayoutChoice:
    """The split a deployment of ``instances`` should run for traffic of these lengths at ``rate``
    req/s: the analytic first guess, then the simulated choice (``tetri bench plan``, ``GET
    /admin/plan``). Requests with a heavy prompt and a heavy output count as co-located, as the
    fallback places them."""
    if instances < 1 or not prompts or len(prompts) != len(outputs):
        raise ValueError("need at least one instance and matching, non-empty prompt and output lengths")
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests per second, not {rate!r}")
    chunk = cfg.chunk_size or timing.knee()
    mask = colocated_by_rule(prompts, outputs, cfg)
    p, _ = plan_split(instances, prompts, outputs, timing, chunk, cfg, mask, rate=rate)
    if not allow_no_prefill:
        if instances < 2:
            raise ValueError("a deployment whose decode engines cannot run whole requests needs 2+ instances")
        p = max(p, 1)
    elif instances < 2:
        return LayoutChoice(0, instances, cfg.plan_objective, {})
    return plan_layout(
        instances,
        prompts,
        outputs,
        timing,
        cfg,
        p,
        rate,
        seed=seed,
        allow_no_prefill=allow_no_prefill,
        colocated_mask=mask,
    )


def planned(sim: ClusterSim) -> ClusterSim:
    """``sim`` with its layout chosen by simulating the candidates, where its system asks for that
    (``layout_plan="simulated"``, ``pd_ratio="auto"``); otherwise it keeps the analytic split."""
    if sim.wants_layout_plan():
        assert sim.rate is not None
        plan = plan_layout(sim.n, sim.prompts(), sim.outputs(), sim.tm, sim.cfg, sim.analytic_prefill, sim.rate,
                           seed=sim.seed, colocated_mask=sim.colocated_mask)  # fmt: skip
        sim.use_layout(plan)
    return sim


def simulate(
    system: str | SystemConfig,
    timing: TimingModel,
    instances: int,
    requests: Sequence[Any],
    seed: int = 0,
    **kw: Any,
) -> SimResult:
    """Simulate ``system`` (a SystemConfig or a ``system_config`` name) on ``instances`` instances
    serving ``requests`` (objects with arrival, prompt_tokens, output_tokens; optional id, cls)."""
    cfg = system if isinstance(system, SystemConfig) else system_config(system)
    return planned(ClusterSim(cfg, timing, instances, requests, seed=seed, **kw)).run()
