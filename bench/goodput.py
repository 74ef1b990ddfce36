"""Goodput under SLOs: the highest Poisson rate at which a share of requests meets a TTFT and a TPOT SLO.

``tetri bench goodput`` (or ``python -m bench.goodput``). One concept, two parts:

* **Attainment** of a run against an SLO: the share of its scored requests whose TTFT is within
  ``ttft_ms`` *and* whose TPOT is within ``tpot_ms`` (a one-token answer has no TPOT: only its TTFT
  counts; a request that failed or never finished misses). The definition is
  ``orchestrator.sim.split.slo_attainment``, the one the planner's ``slo`` objective ranks layouts by.
* **Goodput**: the highest rate at which attainment is at least ``share`` (90%), found by bisection
  (``bisect_rate``) between a rate that meets it and one that does not. Reported per instance.

Each probe is a run of ``span_s`` seconds of Poisson arrivals (60 by default): long enough that a
rate past what a system sustains shows up as a queue that grows through the run (falling
attainment), not as a burst the queue absorbs. Requests that arrive in the first ``warmup`` share of
the span are not scored (the cluster starts empty). Every system sees the same requests at a rate:
a prefix of one shuffled draw of the workload, the same Poisson arrivals.

Default SLOs: a TTFT of 5x and a TPOT of 1.5x the baseline's (``colocated-vllm``) mean TTFT and mean
TPOT at light load (5% of the cluster's decode capacity, ``capacity.capacity_rate``), per workload and
KV regime. ``tetri`` systems run their layout planner on the same SLO (``plan_objective=slo`` with
these targets and share) unless the system names its own ``plan_objective``: what the planner
optimises is what the benchmark measures.

Backends: ``sim`` (the calibrated cluster simulator) and ``native`` (each system live with ``tetri
up`` on this machine, small scale: one deployment per system, probed at each rate in turn).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.sim.split import slo_attainment

SYSTEMS = ("colocated-vllm", "colocated-sarathi", "disagg-simple", "tetri")
BASELINE = "colocated-vllm"
COLOCATED = ("colocated-vllm", "colocated-sarathi")
SHARE = 0.9
TTFT_FACTOR = 5.0
TPOT_FACTOR = 1.5
LIGHT_LOAD = 0.05  # x decode capacity: the baseline's light-load TTFT and TPOT


@dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float
    share: float = SHARE

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def attainment(records: Sequence[dict[str, Any]], slo: SLO) -> float:
    """Share of ``records`` (request dicts: ttft_s, tpot_s, jct_s, error) meeting both SLOs."""
    return slo_attainment(records, slo.ttft_ms, slo.tpot_ms)


@dataclass
class Bisection:
    rate: float  # the highest rate seen to meet the target (0: none did)
    points: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment), by rate
    bracketed: bool = True  # a failing rate above `rate` was seen (False: ran out of evaluations)


def bisect_rate(f: Callable[[float], float], lo: float, hi: float, target: float = SHARE, rel_tol: float = 0.03,
                max_evals: int = 16, min_rate: float | None = None) -> Bisection:  # fmt: skip
    """The highest rate with ``f(rate) >= target``, assuming ``f`` falls with the rate. ``[lo, hi]``
    is a first guess: ``hi`` doubles while it still meets the target, ``lo`` halves (down to
    ``min_rate``, default lo / 64) while it does not; then bisection until the bracket is within
    ``rel_tol`` of its lower end. The answer is the lower end: a rate that was seen to meet it."""
    if not 0 < lo < hi:
        raise ValueError("need 0 < lo < hi")
    floor = lo / 64 if min_rate is None else min_rate
    seen: dict[float, float] = {}

    def ev(r: float) -> float:
        if r not in seen:
            seen[r] = f(r)
        return seen[r]

    def done(rate: float, bracketed: bool = True) -> Bisection:
        return Bisection(rate, sorted(seen.items()), bracketed)

    while ev(hi) >= target:
        lo, hi = hi, hi * 2
        if len(seen) >= max_evals:
            return done(lo, False)
    while ev(lo) < target:
        lo, hi = lo / 2, lo
        if lo < floor or len(seen) >= max_evals:
            return done(0.0)
    while hi / lo - 1 > rel_tol and len(seen) < max_evals:
        mid = (lo + hi) / 2
        if ev(mid) >= target:
            lo = mid
        else:
            hi = mid
    return done(lo)


# ---------------------------------------------------------------------------------------------------
# the simulator
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One workload on one cluster: what every system's bisection shares."""

    workload: str
    seed: int = 0
    profile: str = "h100-llama-2-7b"
    instances: int = 16
    kv_tokens: int | None = None
    network: str = "inter"
    span_s: float = 60.0
    warmup: float = 0.2  # share of the span not scored
    min_requests: int = 200

    @property
    def label(self) -> str:
        return f"{self.workload}, KV {'profile' if self.kv_tokens is None else self.kv_tokens}"


_TIMING: dict[tuple[str, str, int | None], Any] = {}
_BASE: dict[tuple[str, int, int], Any] = {}


def _timing(case: Case) -> Any:
    from backends.engines.simulated.profiles import get_timing

    key = (case.profile, case.network, case.kv_tokens)
    if key not in _TIMING:
        _TIMING[key] = get_timing(case.profile, network=case.network, kv_tokens=case.kv_tokens)
    return _TIMING[key]


def case_requests(case: Case, rate: float) -> tuple[list[Any], float]:
    """The requests of a probe at ``rate``: the prefix of one shuffled draw (grown as needed, so every
    rate and system sees the same lengths in the same order), Poisson arrivals over ``span_s``; and
    the arrival time from which requests are scored."""
    from bench.workloads import build_workload

    n = max(case.min_requests, math.ceil(rate * case.span_s))
    tm = _timing(case)
    key = (case.workload, case.seed, tm.max_context)
    base = _BASE.get(key)
    if base is None or len(base.requests) < n:
        size = max(n, 2 * len(base.requests) if base is not None else 4000)
        base = _BASE[key] = build_workload(case.workload, size, rate=None, seed=case.seed, max_context=tm.max_context)
    from bench.workloads import Workload

    wl = Workload(base.name, base.requests[:n], dict(base.meta)).with_arrivals(rate, case.seed + 1)
    span = wl.requests[-1].arrival
    return wl.requests, case.warmup * span


def scored(records: Sequence[dict[str, Any]], warm_s: float) -> list[dict[str, Any]]:
    return [r for r in records if r.get("arrival", 0.0) >= warm_s]


def with_slo(system: str, slo: SLO) -> str:
    """``tetri`` systems plan their layout for the SLO unless they name their own objective."""
    base, _, opts = system.partition("+")
    if base != "tetri" or "plan_objective" in opts:
        return system
    extra = (f"plan_objective=slo,plan_ttft_slo_ms={slo.ttft_ms:.6g},plan_tpot_slo_ms={slo.tpot_ms:.6g},"
             f"plan_slo_share={slo.share:g}")  # fmt: skip
    return f"{system},{extra}" if opts else f"{system}+{extra}"


def sim_probe(case: Case, system: str, rate: float, slo: SLO) -> dict[str, Any]:
    """One simulated run of ``system`` at ``rate``: its attainment and its means over scored requests."""
    from bench.metrics import summarize
    from orchestrator.sim import simulate

    reqs, warm = case_requests(case, rate)
    res = simulate(system, _timing(case), case.instances, reqs, seed=case.seed)
    recs = scored(res.requests, warm)
    m = summarize(recs, case.instances)
    return {"rate": rate, "attainment": attainment(recs, slo), "scored": len(recs), "split": res.split,
            **{k: m.get(k) for k in ("mean_ttft_ms", "p90_ttft_ms", "mean_tpot_ms", "p90_tpot_ms", "mean_jct_ms")}}


def capacity_hint(case: Case) -> float:
    """The cluster's decode capacity for this workload (req/s): where the bisection starts."""
    from bench.workloads import build_workload
    from orchestrator.sim.capacity import capacity_rate

    tm = _timing(case)
    probe = build_workload(case.workload, 4000, rate=None, seed=case.seed, max_context=tm.max_context).requests
    return capacity_rate(tm, [r.prompt_tokens for r in probe], [r.output_tokens for r in probe], case.instances)


def tpot_bound(case: Case, tpot_ms: float, cap: float) -> float:
    """The highest rate (req/s) at which the cluster's fluid decode floor (``capacity.decode_floor``:
    the smallest batch that keeps up, its step time) has a mean TPOT within ``tpot_ms``: past it no
    scheduler and no layout keeps the *mean* TPOT under the SLO (a 90% attainment needs more)."""
    from bench.workloads import build_workload
    from orchestrator.sim.capacity import decode_floor

    tm = _timing(case)
    probe = build_workload(case.workload, 4000, rate=None, seed=case.seed, max_context=tm.max_context).requests
    prompts, outputs = [r.prompt_tokens for r in probe], [r.output_tokens for r in probe]

    def ok(rate: float) -> float:
        return 1.0 if decode_floor(tm, prompts, outputs, rate, case.instances).tpot_ms <= tpot_ms else 0.0

    return bisect_rate(ok, 0.01 * cap, 0.999 * cap, 0.5, 0.002, 60, min_rate=1e-4 * cap).rate


def light_load(case: Case, cap: float) -> dict[str, Any]:
    """The baseline's mean TTFT and TPOT at light load (all requests: there is no queue to warm)."""
    from bench.metrics import summarize
    from orchestrator.sim import simulate

    rate = LIGHT_LOAD * cap
    reqs, _ = case_requests(case, rate)
    res = simulate(BASELINE, _timing(case), case.instances, reqs, seed=case.seed)
    m = summarize(res.requests, case.instances)
    return {"system": BASELINE, "rate": rate, "mean_ttft_ms": m["mean_ttft_ms"], "mean_tpot_ms": m["mean_tpot_ms"]}


def default_slo(light: dict[str, Any], share: float = SHARE) -> SLO:
    return SLO(TTFT_FACTOR * light["mean_ttft_ms"], TPOT_FACTOR * light["mean_tpot_ms"], share)


def sim_goodput(case: Case, system: str, slo: SLO, cap: float, rel_tol: float = 0.03,
                max_evals: int = 14) -> dict[str, Any]:  # fmt: skip
    """Bisect one system's goodput on one case (a top-level function: it runs in worker processes)."""
    t0 = time.perf_counter()
    run = with_slo(system, slo)
    probes: dict[float, dict[str, Any]] = {}

    def f(rate: float) -> float:
        probes[rate] = sim_probe(case, run, rate, slo)
        return probes[rate]["attainment"]

    hint = tpot_bound(case, slo.tpot_ms, cap) or 0.25 * cap  # no system goes past it by much
    b = bisect_rate(f, 0.6 * hint, 1.15 * hint, slo.share, rel_tol, max_evals, min_rate=0.005 * cap)
    at = probes.get(b.rate, {})
    return {"system": system, "ran_as": run, "goodput_rps": b.rate, "per_instance_rps": b.rate / case.instances,
            "bracketed": b.bracketed, "split": at.get("split"), "at_goodput": at,
            "points": [probes[r] for r, _ in b.points], "tpot_bound_rps": hint,
            "tpot_bound_per_instance_rps": hint / case.instances, "wall_s": time.perf_counter() - t0,
            }  # fmt: skip


def _task(case: Case, system: str, slo: SLO, cap: float, rel_tol: float) -> tuple[Case, str, dict[str, Any]]:
    return case, system, sim_goodput(case, system, slo, cap, rel_tol)


def goodput_sim(workloads: Sequence[str], systems: Sequence[str] = SYSTEMS, seeds: Sequence[int] = (0,),
                kv_regimes: Sequence[int | None] = (None,), profile: str = "h100-llama-2-7b", instances: int = 16,
                span_s: float = 60.0, share: float = SHARE, slo_ttft_ms: float | None = None,
                slo_tpot_ms: float | None = None, rel_tol: float = 0.03, jobs: int = 1,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Goodput of every system on every (workload, KV regime, seed); SLOs per (workload, KV regime)."""
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"backend": "sim", "profile": profile, "instances": instances, "span_s": span_s,
                           "warmup": Case("x").warmup, "share": share, "seeds": list(seeds), "systems": list(systems),
                           "kv_regimes": [k for k in kv_regimes], "rel_tol": rel_tol, "cases": {}}  # fmt: skip
    tasks = []
    for wl in workloads:
        for kv in kv_regimes:
            first = Case(wl, seeds[0], profile, instances, kv, span_s=span_s)
            cap = capacity_hint(first)
            light = light_load(first, cap)
            d = default_slo(light, share)
            slo = SLO(slo_ttft_ms or d.ttft_ms, slo_tpot_ms or d.tpot_ms, share)
            doc["cases"][first.label] = {"workload": wl, "kv_tokens": kv, "capacity_rps": cap, "light_load": light,
                                         "slo": slo.to_dict(), "seeds": {}}  # fmt: skip
            for seed in seeds:
                case = Case(wl, seed, profile, instances, kv, span_s=span_s)
                tasks += [(case, s, slo, cap, rel_tol) for s in systems]

    def record(case: Case, system: str, res: dict[str, Any]) -> None:
        doc["cases"][case.label]["seeds"].setdefault(str(case.seed), {})[system] = res
        if progress:
            progress(f"{case.label}, seed {case.seed}: {system} {res['per_instance_rps']:.2f} req/s per instance")

    if jobs <= 1:
        for t in tasks:
            record(*_task(*t))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            for fut in as_completed([ex.submit(_task, *t) for t in tasks]):
                record(*fut.result())
    for c in doc["cases"].values():  # seeds, then systems, in the order asked
        c["seeds"] = {str(s): {n: c["seeds"][str(s)][n] for n in systems} for s in seeds}
        c["summary"] = summarize_case(c, list(systems))
    doc["wall_s"] = time.perf_counter() - t0
    return doc


def summarize_case(c: dict[str, Any], systems: list[str]) -> dict[str, Any]:
    """Per system: goodput per instance over seeds (mean, min, max); same-run ratios of tetri's."""
    runs = list(c["seeds"].values())
    out: dict[str, Any] = {"systems": {}}
    for s in systems:
        xs = [r[s]["per_instance_rps"] for r in runs]
        out["systems"][s] = {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "per_seed": xs}
    key = "tpot_bound_per_instance_rps"
    bound = [r[s][key] for r in runs for s in systems if key in r[s]]
    if bound:
        out["tpot_bound"] = statistics.fmean(bound)
    tetri = [s for s in systems if s.partition("+")[0] == "tetri"]
    if tetri:
        t = tetri[-1] if "tetri" not in systems else "tetri"
        out["tetri"] = t
        refs = {"best co-located": [s for s in systems if s in COLOCATED], "disagg-simple":
                [s for s in systems if s == "disagg-simple"], "best baseline":
                [s for s in systems if s.partition("+")[0] != "tetri"]}  # fmt: skip
        for name, group in refs.items():
            if not group:
                continue
            ratios = []
            for r in runs:
                best = max(r[s]["per_instance_rps"] for s in group)
                ratios.append(r[t]["per_instance_rps"] / best if best > 0 else math.inf)
            out[f"vs {name}"] = {"mean": statistics.fmean(ratios), "min": min(ratios), "max": max(ratios)}
    return out


# ---------------------------------------------------------------------------------------------------
# live (the built-in engine, small scale)
# ---------------------------------------------------------------------------------------------------
def goodput_live(workload: str, systems: Sequence[str] = SYSTEMS, instances: int = 2, span_s: float = 30.0,
                 share: float = SHARE, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                 seed: int = 0, rate_hint: float = 1.0, max_prompt: int = 96, max_output: int = 24,
                 model: str = "smollm2-135m-instruct", live_backend: str = "native", max_evals: int = 6,
                 rel_tol: float = 0.15, progress: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Each system once with ``tetri up`` (``bench.live``), probed at each bisection rate in turn
    (``span_s`` of Poisson arrivals per probe, lengths capped for this CPU). ``rate_hint`` (req/s) is
    the first guess of the bracket, and the default SLOs come from the baseline at a tenth of it (a CPU
    deployment has no decode-capacity model)."""
    from types import SimpleNamespace

    from backends.engines.simulated.profiles import get_timing
    from bench.live import Deployment, _free_port, deployment_args
    from bench.runner import run_workload
    from bench.workloads import build_workload
    from orchestrator.sim import SYSTEMS as SIM_SYSTEMS
    from orchestrator.sim.planner import recommend_split
    from orchestrator.sim.split import plan_split

    t0 = time.perf_counter()
    tm = get_timing("cpu-smollm2")
    base = build_workload(workload, 4000, rate=None, seed=seed, max_context=tm.max_context).scaled(
        1.0, max_prompt, max_output)  # fmt: skip
    spec = SimpleNamespace(live_backend=live_backend, model=model, kv_tokens=None)
    prompts = [r.prompt_tokens for r in base.requests]
    outputs = [r.output_tokens for r in base.requests]

    def requests_at(rate: float) -> tuple[Any, float]:
        from bench.workloads import Workload

        n = max(8, math.ceil(rate * span_s))
        wl = Workload(base.name, base.requests[:n], dict(base.meta)).with_arrivals(rate, seed + 1)
        return wl, 0.2 * wl.requests[-1].arrival

    simple = plan_split(instances, prompts, outputs, tm, tm.knee(), SIM_SYSTEMS["disagg-simple"], rate=rate_hint)
    tsplit = recommend_split(instances, prompts, outputs, rate_hint, tm, SIM_SYSTEMS["tetri"], seed=seed)
    splits = {"disagg-simple": simple, "tetri": (tsplit.prefill, tsplit.decode)}
    log_dir = Path("/tmp/tetri-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"backend": f"live-{live_backend}", "workload": workload, "instances": instances,
                           "span_s": span_s, "share": share, "seed": seed, "systems": {},
                           "splits": {k: list(v) for k, v in splits.items()}}  # fmt: skip

    def deploy(system: str) -> Deployment:
        split = splits.get(system.partition("+")[0], simple)
        args, env = deployment_args(system, instances, split, spec)
        dep = Deployment(args, env, _free_port(), log_dir / f"goodput-{system.replace('+', '_')}.log")
        dep.wait_ready()
        return dep

    def run_at(dep: Deployment, rate: float) -> list[dict[str, Any]]:
        wl, warm = requests_at(rate)
        res = run_workload(dep.url, wl, instances=instances, show_progress=False)
        return scored(res["requests"], warm)

    slo = SLO(slo_ttft_ms or 0.0, slo_tpot_ms or 0.0, share)
    if not (slo_ttft_ms and slo_tpot_ms):
        from bench.metrics import summarize

        dep = deploy(BASELINE)
        try:
            m = summarize(run_at(dep, LIGHT_LOAD * 2 * rate_hint), instances)
        finally:
            dep.stop()
        doc["light_load"] = {"system": BASELINE, "mean_ttft_ms": m["mean_ttft_ms"], "mean_tpot_ms": m["mean_tpot_ms"]}
        d = default_slo(doc["light_load"], share)
        slo = SLO(slo_ttft_ms or d.ttft_ms, slo_tpot_ms or d.tpot_ms, share)
    doc["slo"] = slo.to_dict()
    for system in systems:
        dep = deploy(system)
        probes: dict[float, dict[str, Any]] = {}
        try:
            def f(rate: float, dep: Deployment = dep, probes: dict = probes, name: str = system) -> float:
                recs = run_at(dep, rate)
                probes[rate] = {"rate": rate, "attainment": attainment(recs, slo), "scored": len(recs)}
                if progress:
                    progress(f"{name} at {rate:.3g} req/s: attainment {probes[rate]['attainment']:.2f}")
                return probes[rate]["attainment"]

            b = bisect_rate(f, 0.5 * rate_hint, 1.5 * rate_hint, share, rel_tol, max_evals)
        finally:
            dep.stop()
        doc["systems"][system] = {"goodput_rps": b.rate, "per_instance_rps": b.rate / instances,
                                  "bracketed": b.bracketed, "points": [probes[r] for r, _ in b.points]}  # fmt: skip
    doc["wall_s"] = time.perf_counter() - t0
    return doc


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def _cell(s: dict[str, Any], spread: bool) -> str:
    if not spread:
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} ({s['min']:.2f}–{s['max']:.2f})"


def markdown(doc: dict[str, Any]) -> str:
    if doc["backend"] != "sim":
        lines = [f"Live ({doc['backend']}), {doc['workload']} on {doc['instances']} instances, "
                 f"{doc['span_s']:g} s per probe; SLO: TTFT ≤ {doc['slo']['ttft_ms']:.0f} ms and TPOT ≤ "
                 f"{doc['slo']['tpot_ms']:.1f} ms for {doc['share']:.0%} of requests.\n",
                 "| system | goodput req/s | per instance | probes (rate: attainment) |",
                 "|---|---:|---:|---|"]  # fmt: skip
        for name, s in doc["systems"].items():
            pts = ", ".join(f"{p['rate']:.2g}: {p['attainment']:.2f}" for p in s["points"])
            lines.append(f"| {name} | {s['goodput_rps']:.2f} | {s['per_instance_rps']:.2f} | {pts} |")
        return "\n".join(lines) + "\n"
    spread = len(doc["seeds"]) > 1
    systems = doc["systems"]
    seeds = ", ".join(map(str, doc["seeds"]))
    lines = [
        f"Goodput per instance (req/s) on {doc['instances']} × {doc['profile']}: the highest Poisson rate at which "
        f"{doc['share']:.0%} of requests meet both the TTFT and the TPOT SLO, over {doc['span_s']:g} s of arrivals "
        f"(the first {doc['warmup']:.0%} not scored), bisected to {doc['rel_tol']:.0%}. Seeds {seeds}"
        + ("; mean (min–max)" if spread else "") + f". Simulated in {doc['wall_s']:.0f} s. Fluid TPOT bound: the "
        "highest rate per instance at which the cluster's decode floor (the smallest batch that keeps up) has a "
        "mean TPOT within the SLO; past it no scheduler keeps even the mean TPOT under it.\n",
        "| workload | KV / instance | SLO TTFT / TPOT ms | " + " | ".join(systems)
        + " | fluid TPOT bound | tetri / best co-located | tetri / disagg-simple | tetri / best baseline |",
        "|---|---|---|" + "---:|" * len(systems) + "---:|---:|---:|---:|",
    ]
    for c in doc["cases"].values():
        summ = c["summary"]
        kv = "profile" if c["kv_tokens"] is None else f"{c['kv_tokens']:,}"
        slo = f"{c['slo']['ttft_ms']:.0f} / {c['slo']['tpot_ms']:.1f}"
        cells = [_cell(summ["systems"][s], spread) for s in systems]
        ratios = []
        for ref in ("best co-located", "disagg-simple", "best baseline"):
            r = summ.get(f"vs {ref}")
            ratios.append("–" if r is None else (f"{r['mean']:.2f}×" + (f" ({r['min']:.2f}–{r['max']:.2f})"
                                                                          if spread else "")))  # fmt: skip
        bound = f"{summ['tpot_bound']:.2f}" if "tpot_bound" in summ else "–"
        lines.append(f"| {c['workload']} | {kv} | {slo} | " + " | ".join(cells) + f" | {bound} | "
                     + " | ".join(ratios) + " |")  # fmt: skip
    splits = []
    for c in doc["cases"].values():
        for s in systems:
            if s.partition("+")[0] in ("tetri", "disagg-simple"):
                at = [r[s].get("split") or {} for r in c["seeds"].values()]
                txt = ", ".join(f"{a.get('prefill', 0)}:{a.get('decode', a.get('colocated', 0))}" for a in at)
                splits.append(f"{c['workload']} (KV {c['kv_tokens'] or 'profile'}) {s}: {txt}")
    if splits:
        lines.append("\nP:D at each seed's goodput: " + "; ".join(splits) + ".")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Attainment against rate per instance, every system, one panel per case (every seed's probes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if doc["backend"] != "sim":
        panels = {doc["workload"]: {"0": doc["systems"]}}
        share, n = doc["share"], doc["instances"]
    else:
        panels = {label: c["seeds"] for label, c in doc["cases"].items()}
        share, n = doc["share"], doc["instances"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, seeds) in zip(axes.flat, panels.items(), strict=False):
        names = list(next(iter(seeds.values())))
        for k, name in enumerate(names):
            for j, run in enumerate(seeds.values()):
                pts = sorted((p["rate"] / n, p["attainment"]) for p in run[name]["points"])
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=3, color=colours[k % len(colours)],
                        alpha=0.8, label=name if j == 0 else None)  # fmt: skip
        ax.axhline(share, color="k", ls="--", lw=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("rate per instance (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "goodput.md", "plot": out / "goodput_attainment.png"}
    paths["results"].write_text(json.dumps(doc, indent=1, default=str))
    paths["report"].write_text(markdown(doc))
    plot(doc, paths["plot"])
    return paths
