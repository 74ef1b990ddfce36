"""Per-request latency records and their summaries (live runs and the simulator share them).

Definitions (times in seconds in records, milliseconds in summaries):

* TTFT: first token received − request sent (live) or arrival (simulator).
* inter-token gaps: differences between consecutive token arrival times (a chunk carrying k tokens
  counts as k tokens at one instant: k−1 zero gaps).
* TPOT: (last token − first token) / (tokens − 1), per request; undefined for one-token answers.
* JCT: last token (end of stream) − request sent.
* throughput_rps: completed requests / makespan (first arrival to last completion).
* instance_seconds: instances × makespan (what the deployment is provisioned for during the run);
  ``perf_per_instance_s`` = completed requests / instance_seconds (the report's perf/$).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    id: str
    cls: str = ""
    prompt_tokens: int = 0
    expected_output_tokens: int = 0
    arrival: float = 0.0  # scheduled arrival (s after start)
    sent: float | None = None  # monotonic clock, absolute
    token_times: list[float] = field(default_factory=list)  # absolute, one per token
    end: float | None = None
    output_tokens: int = 0
    error: str | None = None
    status: int | None = None
    finish_reason: str | None = None

    def add_tokens(self, t: float, count: int = 1) -> None:
        for _ in range(max(0, count)):
            self.token_times.append(t)
        self.output_tokens += max(0, count)

    @property
    def ttft_s(self) -> float | None:
        if self.sent is None or not self.token_times:
            return None
        return self.token_times[0] - self.sent

    @property
    def gaps_s(self) -> list[float]:
        tt = self.token_times
        return [tt[i] - tt[i - 1] for i in range(1, len(tt))]

    @property
    def tpot_s(self) -> float | None:
        """(last − first token time) / (tokens − 1); tokens = max(token events, reported usage)."""
        tt = self.token_times
        n = max(len(tt), self.output_tokens)
        if len(tt) < 2 or n < 2:
            return None
        return (tt[-1] - tt[0]) / (n - 1)

    @property
    def jct_s(self) -> float | None:
        if self.sent is None or self.error is not None:
            return None
        end = self.end if self.end is not None else (self.token_times[-1] if self.token_times else None)
        return None if end is None else end - self.sent

    def to_dict(self, t0: float = 0.0) -> dict[str, Any]:
        d = asdict(self)
        d.pop("token_times")
        d["sent"] = None if self.sent is None else self.sent - t0
        d["end"] = None if self.end is None else self.end - t0
        d["ttft_s"] = self.ttft_s
        d["tpot_s"] = self.tpot_s
        d["jct_s"] = self.jct_s
        d["gaps_s"] = self.gaps_s
        d["finish"] = None if self.jct_s is None else (self.end or self.token_times[-1]) - t0
        return d


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return float(v[0])
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def _stats(prefix: str, values: list[float], out: dict[str, Any]) -> None:
    out[f"mean_{prefix}_ms"] = _ms(sum(values) / len(values)) if values else None
    out[f"p50_{prefix}_ms"] = _ms(percentile(values, 50))
    out[f"p90_{prefix}_ms"] = _ms(percentile(values, 90))
    out[f"p99_{prefix}_ms"] = _ms(percentile(values, 99))


def summarize(records: Iterable[dict[str, Any]], instances: int = 1, start: float = 0.0) -> dict[str, Any]:
    """Summary of request dicts with keys ttft_s, tpot_s, jct_s, finish (s after start), error,
    arrival, output_tokens."""
    recs = list(records)
    ok = [r for r in recs if r.get("error") is None and r.get("jct_s") is not None]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    tpot = [r["tpot_s"] for r in ok if r.get("tpot_s") is not None]
    jct = [r["jct_s"] for r in ok]
    gaps: list[float] = []
    for r in ok:
        gaps.extend(r.get("gaps_s") or [])
    out: dict[str, Any] = {"requests": len(recs), "completed": len(ok), "errors": len(recs) - len(ok)}
    _stats("ttft", ttft, out)
    _stats("tpot", tpot, out)
    _stats("jct", jct, out)
    if gaps:
        out["p99_itl_ms"] = _ms(percentile(gaps, 99))
        out["max_itl_ms"] = _ms(max(gaps))
    finishes = [r["finish"] for r in ok if r.get("finish") is not None]
    arrivals = [r.get("arrival", 0.0) or 0.0 for r in recs]
    t0 = min(arrivals, default=start) if arrivals else start
    makespan = (max(finishes) - min(t0, start)) if finishes else 0.0
    out["makespan_s"] = makespan
    out["throughput_rps"] = len(ok) / makespan if makespan > 0 else None
    toks = sum(int(r.get("output_tokens") or 0) for r in ok)
    out["output_tokens_per_s"] = toks / makespan if makespan > 0 else None
    out["instances"] = instances
    out["instance_seconds"] = instances * makespan
    out["perf_per_instance_s"] = len(ok) / (instances * makespan) if makespan > 0 and instances else None
    return out


def by_class(records: Iterable[dict[str, Any]], instances: int = 1) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r.get("cls") or "?", []).append(r)
    return {k: summarize(v, instances) for k, v in sorted(groups.items())}


def pct(x: float | None) -> str:
    """A relative change as a signed percentage for a report ("–" when unknown)."""
    return "–" if x is None else f"{x * 100:+.0f}%"


def ratio(new: float | None, base: float | None) -> float | None:
    """Relative change new vs base (−0.9 = 90% lower)."""
    if new is None or base is None or base == 0:
        return None
    return new / base - 1.0
