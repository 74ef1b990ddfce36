"""The analytic layout: how a disaggregated system divides its instances between prefill and decode
from the workload's rate and lengths (``plan_split``), whether a layout keeps up
(``layout_utilisation``), and the SLO rule layouts are scored by (``slo_attainment``). The
simulated planner (planner.py) starts from this split; the simulator (loop.py) runs it when no
simulated plan is asked for."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backends.engines.simulated.timing import TimingModel
from orchestrator.sim.capacity import decode_floor
from orchestrator.sim.config import SystemConfig


def plan_split(
    n: int,
    prompts: Sequence[int],
    outputs: Sequence[int],
    timing: TimingModel,
    chunk: int,
    cfg: SystemConfig,
    colocated_mask: Sequence[bool] | None = None,
    rate: float | None = None,
    prefill_util: float = 0.7,
    decode_util: float = 0.95,
) -> tuple[int, int]:
    """The prefill:decode split. Work per request: prefill at the knee's tokens/s; decode at the
    batch the KV pool sustains (min(max_num_seqs, KV / mean context)), so a decode side that is
    memory-bound is sized as such. Requests that fall back to co-located placement count as decode
    work. P minimises max(prefill load / (P·prefill_util), decode load / (D·decode_util)): prefill is
    kept below ~70% busy (its queueing is TTFT), decode may run hot (throughput-bound). Without a
    rate the split is the plain work share. An explicit ``cfg.pd_ratio = "P:D"`` wins; when most
    requests fall back to co-located placement there is no prefill pool at all (P = 0)."""
    if cfg.pd_ratio != "auto":
        p, d = (int(x) for x in cfg.pd_ratio.split(":"))
        if p + d != n:
            raise ValueError(f"pd_ratio {cfg.pd_ratio} does not add up to {n} instances")
        return p, d
    if n < 2 or not prompts:
        return 0, n
    if colocated_mask is not None and 2 * sum(1 for m in colocated_mask if m) >= len(prompts):
        return 0, n
    tput = chunk / timing.prefill_s(chunk)
    mean_ctx = max(1.0, sum(p + o / 2 for p, o in zip(prompts, outputs, strict=True)) / len(prompts))
    batch = max(1, min(cfg.max_num_seqs, int(timing.total_kv_tokens / mean_ctx)))
    per_tok = timing.decode_s(batch, mean_ctx) / batch
    pw = dw = 0.0  # instance-seconds of work per request, summed
    for k, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        if colocated_mask is not None and colocated_mask[k]:
            dw += p / tput + o * per_tok
        else:
            pw += p / tput
            dw += o * per_tok
    if pw <= 0:
        return 0, n
    if not rate or not math.isfinite(rate):
        p = max(1, min(n - 1, round(n * pw / (pw + dw))))
        return p, n - p
    p_load = rate * pw / len(prompts)  # instances' worth of prefill work at this rate
    d_load = rate * dw / len(prompts)
    p = min(range(1, n), key=lambda k: (max(p_load / (k * prefill_util), d_load / ((n - k) * decode_util)), k))
    return p, n - p


@dataclass(frozen=True)
class LayoutChoice:
    prefill: int
    decode: int
    objective: str
    candidates: dict[str, dict[str, float]]  # "P:D" -> mean_ttft_ms, mean_jct_ms, score, util
    rejected: dict[str, float] = field(default_factory=dict)  # "P:D" -> util (>= 1), not simulated
    late_binding: str | None = None  # chosen with the split (plan_late_binding=choose); None: the system's

    def to_dict(self) -> dict[str, Any]:
        return {"prefill": self.prefill, "decode": self.decode, "objective": self.objective,
                "candidates": self.candidates, "rejected": self.rejected,
                **({"late_binding": self.late_binding} if self.late_binding else {})}  # fmt: skip


def meets_slo(rec: dict[str, Any], ttft_slo_ms: float, tpot_slo_ms: float = math.inf) -> bool:
    """A finished request whose TTFT is within ``ttft_slo_ms`` and whose TPOT (undefined for a
    one-token answer: not checked) is within ``tpot_slo_ms``. A request that failed or never
    finished misses."""
    if rec.get("error") is not None or rec.get("jct_s") is None or rec.get("ttft_s") is None:
        return False
    if 1000.0 * rec["ttft_s"] > ttft_slo_ms:
        return False
    tpot = rec.get("tpot_s")
    return tpot is None or 1000.0 * tpot <= tpot_slo_ms


def slo_attainment(records: Sequence[dict[str, Any]], ttft_slo_ms: float, tpot_slo_ms: float = math.inf) -> float:
    """The share of ``records`` (request dicts: ttft_s, tpot_s, jct_s, error) that meet both SLOs;
    every request counts, unfinished ones as misses. Goodput is the highest rate at which this stays
    at or above a target share (``bench.goodput``)."""
    if not records:
        raise ValueError("no requests to score")
    return sum(1 for r in records if meets_slo(r, ttft_slo_ms, tpot_slo_ms)) / len(records)


def layout_utilisation(
    p: int,
    n: int,
    prompts: Sequence[int],
    outputs: Sequence[int],
    timing: TimingModel,
    cfg: SystemConfig,
    rate: float,
    colocated_mask: Sequence[bool] | None,
) -> float:
    """Steady-state utilisation of layout P:(n - P): the busier pool's seconds of work per second.
    Decode instances: the steps their decode demand needs at the largest batch they hold, plus the
    prompts they prefill (``capacity.decode_floor``). Prefill instances: their prompts at the knee's
    tokens/s. At 1 or more that pool falls behind for as long as the load lasts."""
    here = [True] * len(prompts) if p == 0 else list(colocated_mask or [False] * len(prompts))
    floor = decode_floor(timing, prompts, outputs, rate, n - p, prefilled_here=here, max_batch=cfg.max_num_seqs)
    if p == 0:
        return floor.utilisation
    chunk = cfg.chunk_size or timing.knee()
    per_token = timing.prefill_s(chunk) / chunk
    work = sum(q for q, h in zip(prompts, here, strict=True) if not h) * per_token / len(prompts)
    return max(floor.utilisation, rate * work / p)


def colocated_by_rule(prompts: Sequence[int], outputs: Sequence[int], cfg: SystemConfig) -> list[bool]:
    """The requests the HPHD rule prefills on their decode instance even beside a prefill pool."""
    hp, hd = cfg.policy.heavy_prefill_threshold, cfg.policy.heavy_decode_threshold
    return [p > hp and o > hd for p, o in zip(prompts, outputs, strict=True)]
