"""Steady-state decode capacity, and the mean JCT that no scheduler can beat, from the timing model.

Fluid view of an instance that decodes ``b`` sequences of mean context ``c̄`` (the token-weighted
context of the workload: a token at position ``j`` of a request with prompt ``p`` reads ``p + j``
KV tokens): a step takes ``t(b) = iter_s(decode b, context b·c̄)`` and yields ``b`` tokens. The
prompts prefilled on the instance take a share ``ρ`` of its time, at least their marginal cost in a
hybrid batch (whether they run there or on a prefill instance: a pass of its own costs more).

To keep up with ``rate`` req/s, ``M`` instances must generate ``rate·E[out − 1]/M`` decode tokens/s
each, so the mean batch must be at least the smallest ``b*`` with ``(1 − ρ)·b*/t(b*)`` at that
demand. A larger batch only makes the step slower, so every token takes at least ``t(b*)`` on
average, and the mean JCT is at least the solo-prefill TTFT plus ``E[out − 1]·t(b*)``. Past the
KV limit (``b ≤ KV / c̄``) no batch keeps up: the load is over the cluster's decode capacity and
every layout's queue grows for as long as the load lasts.

It is a steady-state bound. A finite run that starts empty decodes small batches while it warms up
and drains, so its mean over *all* requests can sit below it; compare it with requests that
arrive once the run is warm (``bench.headroom`` scores the middle of the run). It ignores how the
batch varies: a request is more often in a large batch than a small one (a size-biased sample), so
where batches hold only a few sequences (a CPU engine, a light load) it is loose. At H100-scale
batches the best system sits within a few percent of it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from backends.engines.simulated.timing import TimingModel


@dataclass(frozen=True)
class DecodeFloor:
    rate: float  # offered load, req/s
    instances: int
    demand_tok_s: float  # decode tokens/s each instance must generate
    peak_tok_s: float  # decode tokens/s one instance makes at the largest batch KV (or max_batch) allows
    prefill_share: float  # of each instance's time, prefilling at that batch (may exceed 1: overload)
    batch: float  # smallest mean batch that keeps up (inf when none does)
    tpot_ms: float  # the step time at that batch: no lower mean TPOT keeps up
    ttft_floor_ms: float  # every prompt prefilled alone on an idle instance
    jct_floor_ms: float  # inf when the load is over capacity

    @property
    def capacity_tok_s(self) -> float:
        """Decode tokens/s an instance can make in the time prefill leaves free."""
        return max(0.0, 1.0 - self.prefill_share) * self.peak_tok_s

    @property
    def utilisation(self) -> float:
        """Instance-seconds of work per second, at the largest batch: prefill's share plus the
        decode steps the demand needs. Past 1 it says how much faster the backlog grows than the
        work gets done, so two layouts that both fall behind can be ranked."""
        return self.prefill_share + self.demand_tok_s / self.peak_tok_s if self.peak_tok_s > 0 else math.inf

    @property
    def sustainable(self) -> bool:
        return self.utilisation < 1.0

    def to_dict(self) -> dict[str, float]:
        return {
            "rate": self.rate, "instances": self.instances, "demand_tok_s": self.demand_tok_s,
            "peak_tok_s": self.peak_tok_s, "capacity_tok_s": self.capacity_tok_s, "prefill_share": self.prefill_share,
            "utilisation": self.utilisation, "batch": self.batch,
            "tpot_ms": self.tpot_ms, "ttft_floor_ms": self.ttft_floor_ms, "jct_floor_ms": self.jct_floor_ms,
        }  # fmt: skip


def token_weighted_context(prompts: Sequence[int], outputs: Sequence[int]) -> float:
    """Mean KV context a decode step reads per sequence: over decode tokens, not over requests."""
    tokens = sum(max(0, o - 1) for o in outputs)
    if tokens == 0:
        return 0.0
    return sum(max(0, o - 1) * (p + o / 2) for p, o in zip(prompts, outputs, strict=True)) / tokens


class _Steps:
    """Step time and marginal prefill cost at a (fractional) batch, cached per integer batch."""

    def __init__(self, tm: TimingModel, ctx: float, prompts: Counter[int], requests: int) -> None:
        self.tm, self.ctx, self.prompts, self.requests = tm, ctx, prompts, requests
        self._step: dict[int, float] = {}

    def step_int(self, k: int) -> float:
        v = self._step.get(k)
        if v is None:
            v = self._step[k] = self.tm.iter_s(0, 0.0, 0, k, int(k * self.ctx))
        return v

    def step(self, b: float) -> float:
        lo = max(1, math.floor(b))
        if b <= lo:
            return self.step_int(lo)
        return self.step_int(lo) + (b - lo) * (self.step_int(lo + 1) - self.step_int(lo))

    def prefill_share_s(self, b: float) -> float:
        """Mean prefill seconds per request (of all requests, prefilled here or not) that a decode
        batch of ``b`` absorbs."""
        if not self.prompts:
            return 0.0
        k = max(1, round(b))
        decode = self.step_int(k)
        cost = sum(c * (self.tm.iter_s(p, float(p * p), 1, k, int(k * self.ctx)) - decode)
                   for p, c in self.prompts.items())  # fmt: skip
        return max(0.0, cost) / self.requests


def decode_floor(
    tm: TimingModel,
    prompts: Sequence[int],
    outputs: Sequence[int],
    rate: float,
    instances: int,
    prefilled_here: Sequence[bool] | None = None,
    max_batch: float | None = None,
) -> DecodeFloor:
    """The steady-state bound of ``instances`` decode instances carrying every request at ``rate``.
    ``prefilled_here`` marks the prompts these instances also prefill (default: all of them, the
    whole cluster); ``max_batch`` caps the batch below the KV limit (an engine's max_num_seqs)."""
    if not prompts or len(prompts) != len(outputs) or instances < 1 or rate <= 0:
        raise ValueError("need matching, non-empty lengths, 1+ instances and a positive rate")
    n = len(prompts)
    ttft = 1000.0 * sum(tm.prefill_s(p) for p in prompts) / n
    mask = prefilled_here if prefilled_here is not None else [True] * n
    ctx = token_weighted_context(prompts, outputs)
    steps = _Steps(tm, ctx, Counter(p for p, m in zip(prompts, mask, strict=True) if m), n)
    decode_tokens = sum(max(0, o - 1) for o in outputs) / n
    demand = rate * decode_tokens / instances
    b_max = tm.total_kv_tokens / ctx if ctx > 0 else math.inf
    if max_batch is not None:
        b_max = min(b_max, max_batch)
    b_max = max(1.0, min(b_max, 1e5))
    share = rate / instances * steps.prefill_share_s(b_max)
    peak = b_max / steps.step(b_max)

    def over() -> DecodeFloor:
        return DecodeFloor(rate, instances, demand, peak, share, math.inf, math.inf, ttft, math.inf)

    if demand <= 0:
        return DecodeFloor(rate, instances, 0.0, peak, share, 0.0, 0.0, ttft, ttft)
    if share + demand / peak >= 1.0:
        return over()
    b = 1.0
    for _ in range(12):  # prefill's share grows with the batch it rides in: iterate to the fixed point
        busy = 1.0 - rate / instances * steps.prefill_share_s(b)
        if busy * peak <= demand:
            return over()
        lo, hi = 0.0, b_max
        for _ in range(50):
            mid = (lo + hi) / 2
            if busy * mid / steps.step(max(mid, 1e-9)) >= demand:
                hi = mid
            else:
                lo = mid
        if abs(hi - b) < 1e-3:
            b = hi
            break
        b = hi
    tpot = 1000.0 * steps.step(b)
    return DecodeFloor(rate, instances, demand, peak, share, b, tpot, ttft, ttft + decode_tokens * tpot)


def jct_floor_of(floor: DecodeFloor, tm: TimingModel, prompts: Sequence[int], outputs: Sequence[int]) -> float:
    """The floor's mean JCT, ms, for these requests (a sample of the traffic ``floor`` was computed
    for): each one's solo prefill, then its decode tokens at the floor's TPOT. A scored window holds
    a sample whose mean output differs from the whole run's by a few percent, and so does its floor."""
    if not prompts or len(prompts) != len(outputs):
        raise ValueError("need matching, non-empty lengths")
    if not math.isfinite(floor.tpot_ms):
        return math.inf  # past capacity: no floor
    n = len(prompts)
    ttft = 1000.0 * sum(tm.prefill_s(p) for p in prompts) / n
    return ttft + sum(max(0, o - 1) for o in outputs) / n * floor.tpot_ms


def capacity_rate(
    tm: TimingModel, prompts: Sequence[int], outputs: Sequence[int], instances: int, max_batch: float | None = None
) -> float:
    """The highest rate (req/s) whose decode demand ``instances`` instances can sustain."""
    lo, hi = 0.0, 1.0
    while decode_floor(tm, prompts, outputs, hi, instances, max_batch=max_batch).sustainable:
        lo, hi = hi, hi * 2
        if hi > 1e7:
            return math.inf
    for _ in range(40):
        mid = (lo + hi) / 2
        if decode_floor(tm, prompts, outputs, mid, instances, max_batch=max_batch).sustainable:
            lo = mid
        else:
            hi = mid
    return lo
