"""The saturation knee, measured: prefill tokens/s against tokens per forward pass.

TetriInfer chunks prefill at the accelerator's saturation point: the smallest number of tokens
per forward pass that reaches (within 5%) the peak prefill throughput. `profile_knee` sweeps
that size, `resolve_chunk_size("auto", ...)` returns the knee cached per (device, model) under
`cache_dir()/profiles/`, profiling once when there is none. Also here: decode tokens/s against
batch size (for docs/benchmarks.md).

So that one noisy pass cannot decide the chunk size, each size is timed several times and its
median kept, and the knee comes from a fitted saturation curve, throughput(t) = a·t/(t^n + k^n)^(1/n)
(n = 1: a fixed per-pass cost plus a per-token cost; larger n, a sharper knee): the smallest swept
size within 5% of the fitted asymptote a. When the range ends before that, the profile says "no
knee within range" (and the largest size is used) instead of calling the last point a knee. The
load average during the sweep is recorded, and a profile taken on a busy machine is flagged.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from backends.engines.native.model_source import DEFAULT_MODEL
from backends.engines.paths import cache_dir

if TYPE_CHECKING:
    from backends.engines.api import EngineRequest, StepOutput
    from backends.engines.native.kv_cache import KVPool
    from backends.engines.native.llama import NativeLlama
    from backends.engines.native.scheduler import Scheduler


class ProfiledEngine(Protocol):
    """What the profiler needs of an engine: NativeEngine, which resolves chunk_size="auto" here (so
    this module takes the engine it is given; prepare.py builds one for `tetri profile`)."""

    model_name: str
    device: torch.device
    max_context: int
    max_batch: int
    pool: KVPool
    model: NativeLlama
    scheduler: Scheduler

    def add_request(self, request: EngineRequest) -> None: ...

    def step(self) -> list[StepOutput]: ...

    def abort(self, request_id: str) -> None: ...


log = logging.getLogger(__name__)

DEFAULT_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)
KNEE_TOLERANCE = 0.05
# Prompts in one profiled pass are at most this long: a big chunk packs several prompts, as the
# engine does under load (and attention over one 2048-token prompt is not what a chunk costs).
PACK_PROMPT_TOKENS = 512
# Per size: repeat the pass until this much time has gone by (at least once).
MIN_SECONDS = {"cpu": 0.25, "cuda": 0.2}
# The whole sweep: once past this, no bigger sizes are tried (a CPU start stays short).
BUDGET_SECONDS = {"cpu": 30.0, "cuda": 120.0}
# Past the peak, stop after this many sizes in a row below STOP_FRACTION of the best so far.
STOP_AFTER = 2
STOP_FRACTION = 0.9
# Each size is timed at least this many times; its median pass counts.
REPEATS = 5
# A profile taken with the 1-minute load average above this fraction of the cores was competing
# with other work: flagged, and worth re-taking (`tetri profile --check`).
HIGH_LOAD_PER_CORE = 0.5


@dataclass
class ProfileResult:
    model: str
    device: str
    curve: list[tuple[int, float]]  # (tokens per forward pass, prefill tokens/s)
    knee: int
    peak_tokens_per_s: float = 0.0
    created: float = field(default_factory=time.time)
    pack_prompt_tokens: int = PACK_PROMPT_TOKENS
    # False: throughput was still rising at the largest size ("no knee within range"); `knee` is
    # then that largest size, the best known, not a measured saturation point.
    knee_found: bool = True
    fit: dict[str, float] | None = None  # `saturation` fitted: {"a": asymptote tokens/s, "k", "n", "r2"}
    repeats: int = 1
    loadavg: float | None = None  # the highest 1-minute load average seen during the sweep
    cpu_count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def high_load(self) -> bool:
        return self.loadavg is not None and self.loadavg > HIGH_LOAD_PER_CORE * (self.cpu_count or 1)

    def warnings(self) -> list[str]:
        out = []
        if not self.knee_found:
            top = max(n for n, _ in self.curve)
            out.append(f"no knee within range: throughput was still rising at {top} tokens per pass; "
                       f"using {self.knee} (sweep larger --sizes to find the knee)")
        if self.high_load:
            out.append(f"profiled under load (load average {self.loadavg:.1f} on {self.cpu_count} cores): other "
                       "work competed for the machine; re-check on a quiet one (`tetri profile --check`)")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["curve"] = [(int(a), float(b)) for a, b in known.get("curve", [])]
        return cls(**known)


def find_knee(curve: list[tuple[int, float]], tolerance: float = KNEE_TOLERANCE) -> int:
    """Smallest size whose throughput is within `tolerance` of the peak (the raw-point rule; the
    profile uses `fit_knee`, which this one backs up when no curve fits)."""
    peak = max(tps for _n, tps in curve)
    return min(n for n, tps in curve if tps >= (1.0 - tolerance) * peak)


@dataclass
class KneeFit:
    knee: int  # the smallest swept size within tolerance of the asymptote, else the largest size
    found: bool
    a: float | None = None
    k: float | None = None
    n: float | None = None
    r2: float | None = None

    def predict(self, t: float) -> float:
        assert self.a is not None and self.k is not None and self.n is not None
        return saturation(t, self.a, self.k, self.n)


def saturation(t: Any, a: float, k: float, n: float) -> Any:
    """a·t / (t^n + k^n)^(1/n): linear (a·t/k) for small t, flat (a) for large t; n = 1 is a fixed
    per-pass cost plus a per-token cost (a·t/(t + k)), larger n a sharper knee (a roofline)."""
    import numpy as np

    t = np.asarray(t, dtype=float)
    return a * np.exp(np.log(t) - np.logaddexp(n * np.log(t), n * np.log(k)) / n)


def fit_knee(curve: list[tuple[int, float]], tolerance: float = KNEE_TOLERANCE) -> KneeFit:
    """Fit `saturation` to the (median) points; the knee is the smallest swept size whose fitted
    throughput is within `tolerance` of the fitted asymptote a. None such (the range ends while
    the curve still climbs): not found, and the largest size stands in. One outlying point moves
    a fitted curve a little, not the knee to wherever the outlier is (as an arg-max would)."""
    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit

    sizes = np.array([n for n, _ in curve], dtype=float)
    tps = np.array([v for _, v in curve], dtype=float)
    largest = int(sizes.max())
    if len(curve) < 3:  # too few points to fit: the raw rule, and a knee only short of the end
        knee = find_knee(curve, tolerance)
        return KneeFit(knee, knee < largest or len(curve) == 1)

    def model(t: Any, a: float, log_k: float, n: float) -> Any:
        return saturation(t, a, float(np.exp(log_k)), n)

    best: tuple[float, Any] | None = None
    for n0 in (1.0001, 2.0, 4.0, 8.0):  # a few starts: the sharpness is the hard parameter
        try:
            with warnings.catch_warnings():  # an exact or flat fit has no covariance: not our concern
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(model, sizes, tps, p0=(float(tps.max()), float(np.log(np.median(sizes))), n0),
                                      bounds=([1e-9, -10.0, 1.0], [np.inf, 30.0, 30.0]), maxfev=20_000)
        except (RuntimeError, ValueError):
            continue
        sse = float(((tps - model(sizes, *params)) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, params)
    if best is None:
        knee = find_knee(curve, tolerance)
        return KneeFit(knee, knee < largest)
    sse, (a, log_k, n) = best
    k = float(np.exp(log_k))
    total = float(((tps - tps.mean()) ** 2).sum())
    r2 = 1.0 - sse / total if total > 0 else 1.0
    # saturation(t) >= (1 - tol)·a  <=>  t >= k·(q / (1 - q))^(1/n), q = (1 - tol)^n
    q = (1.0 - tolerance) ** n
    threshold = k * (q / (1.0 - q)) ** (1.0 / n)
    reached = [int(x) for x in sizes if x >= threshold * (1 - 1e-9)]
    if reached:
        return KneeFit(min(reached), True, float(a), k, float(n), r2)
    return KneeFit(largest, False, float(a), k, float(n), r2)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on every platform
        return None


def device_name(device: str | torch.device = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()} cores"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120]


def profile_path(model: str, device: str | torch.device = "cpu") -> Path:
    return cache_dir() / "profiles" / f"{_slug(device_name(device))}__{_slug(model)}.json"


def load_cached(model: str, device: str | torch.device = "cpu") -> ProfileResult | None:
    path = profile_path(model, device)
    if not path.exists():
        return None
    try:
        return ProfileResult.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError):
        return None


def save_cached(result: ProfileResult, device: str | torch.device = "cpu") -> Path:
    path = profile_path(result.model, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2))
    tmp.replace(path)
    return path


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _prefill_pass_seconds(engine: ProfiledEngine, tokens: int, generator: torch.Generator) -> float:
    """Time one forward pass that prefills `tokens` fresh tokens (packed prompts)."""
    from backends.engines.native.kv_cache import BlockTable, blocks_for
    from backends.engines.native.llama import ForwardBatch, PrefillSeq

    pool, dev = engine.pool, engine.device
    vocab = engine.model.vocab_size
    lengths = [PACK_PROMPT_TOKENS] * (tokens // PACK_PROMPT_TOKENS)
    if tokens % PACK_PROMPT_TOKENS:
        lengths.append(tokens % PACK_PROMPT_TOKENS)
    tables = [BlockTable(pool.allocate(blocks_for(n))) for n in lengths]
    try:
        ids, pos, slots, seqs = [], [], [], []
        for n, table in zip(lengths, tables, strict=True):
            seqs.append(PrefillSeq(q_start=len(ids), q_len=n, ctx_len=n))
            ids.append(torch.randint(3, vocab, (n,), generator=generator))
            pos.append(torch.arange(n))
            slots.append(pool.slots(table, 0, n).cpu())
        batch = ForwardBatch(
            input_ids=torch.cat(ids).to(dev),
            positions=torch.cat(pos).to(dev),
            write_slots=torch.cat(slots).to(dev),
            prefill=seqs,
            sample_idx=torch.tensor([s.q_start + s.q_len - 1 for s in seqs], device=dev),
        )
        _sync(dev)
        t0 = time.perf_counter()
        engine.model.forward(batch, pool)
        _sync(dev)
        return time.perf_counter() - t0
    finally:
        for table in tables:
            pool.release(table)


def profile_knee(
    engine: ProfiledEngine,
    sizes: list[int] | tuple[int, ...] | None = None,
    *,
    save: bool = True,
    budget_s: float | None = None,
    early_stop: bool = True,
    rounds: int = 1,
    progress: Callable[[int, int], None] | None = None,
    repeats: int = REPEATS,
) -> ProfileResult:
    """Sweep tokens per prefill forward pass; return the curve and the knee (and cache it).

    Sizes go up from the smallest; the sweep stops early once throughput has clearly fallen
    past its peak (STOP_AFTER sizes below STOP_FRACTION of the best) or the time budget is spent.
    Each size is timed at least `repeats` times and its median pass counts; `rounds` > 1 repeats
    the sweep (over the sizes the first round reached), adding to each size's samples. The knee
    comes from `fit_knee`. prepare.profile_model profiles a model spec (builds the engine).
    """
    sizes = sorted(set(sizes or DEFAULT_SIZES))
    sizes = [n for n in sizes if n <= min(engine.pool.total_tokens, engine.max_context * 64)]
    if not sizes:
        raise ValueError("no profile size fits this engine's KV pool")
    gen = torch.Generator().manual_seed(0)
    min_s = MIN_SECONDS.get(engine.device.type, 0.25)
    # Warm up (allocator, kernels, thread pools) on a mid-size pass.
    _prefill_pass_seconds(engine, min(sizes[len(sizes) // 2], 256), gen)
    budget = budget_s if budget_s is not None else BUDGET_SECONDS.get(engine.device.type, 60.0)
    repeats = max(1, repeats)
    started = time.perf_counter()
    samples: dict[int, list[float]] = {}
    load = [_loadavg()]

    def med(n: int) -> float:
        return statistics.median(samples[n])

    def measure(n: int) -> None:
        spent, reps = 0.0, 0
        while reps < repeats or (spent < min_s and reps < 20):
            dt = _prefill_pass_seconds(engine, n, gen)
            samples.setdefault(n, []).append(dt)
            spent += dt
            reps += 1

    below = 0
    for n in sizes:
        if samples:
            # Stop past the peak, or when this size's passes would overrun the budget.
            last = max(samples)
            predicted = repeats * n * med(last) / last
            if early_stop and (below >= STOP_AFTER or time.perf_counter() - started + predicted > budget):
                break
        measure(n)
        if progress is not None:  # (sizes done, sizes at most): a first run shows how far it is
            progress(len(samples), len(sizes))
        peak = max(k / med(k) for k in samples)
        below = below + 1 if n / med(n) < STOP_FRACTION * peak else 0
    for _ in range(rounds - 1):
        for n in sorted(samples):
            measure(n)
    load.append(_loadavg())
    curve = [(n, n / med(n)) for n in sorted(samples)]
    fit = fit_knee(curve)
    seen = [x for x in load if x is not None]
    result = ProfileResult(
        model=engine.model_name,
        device=device_name(engine.device),
        curve=curve,
        knee=fit.knee,
        peak_tokens_per_s=max(t for _n, t in curve),
        knee_found=fit.found,
        fit=None if fit.a is None else {"a": fit.a, "k": fit.k or 0.0, "n": fit.n or 1.0, "r2": fit.r2 or 0.0},
        repeats=repeats,
        loadavg=max(seen) if seen else None,
        cpu_count=os.cpu_count(),
    )
    if save:
        save_cached(result, engine.device)
    return result


def resolve_chunk_size(
    chunk_size: int | str,
    model: str = DEFAULT_MODEL,
    device: str = "cpu",
    engine: ProfiledEngine | None = None,
) -> int:
    """An explicit size is returned as is; "auto" gives the cached knee, else profiles `engine` once
    (None: LookupError; `tetri profile` caches a knee)."""
    if chunk_size != "auto":
        return int(chunk_size)
    from backends.engines.native.model_source import file_lock

    name = engine.model_name if engine is not None else model
    cached = load_cached(name, device)
    if cached is not None:
        for warning in cached.warnings():  # a knee that may not be one is worth a line in the log
            log.warning("cached chunk-size profile of %s: %s", name, warning)
        return cached.knee
    # Workers starting together profile once: the others wait for the lock, then read the cache.
    with file_lock(f"profile-{_slug(device_name(device))}-{_slug(name)}"):
        cached = load_cached(name, device)
        if cached is not None:
            return cached.knee
        if engine is None:
            raise LookupError(f"no cached chunk-size profile of {name} on {device_name(device)}: run `tetri profile`")
        result = profile_knee(engine)
        for warning in result.warnings():
            log.warning("chunk-size profile of %s: %s", name, warning)
        return result.knee


def decode_throughput(
    engine: ProfiledEngine,
    batch_sizes: list[int] | tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    context: int = 128,
    steps: int = 8,
) -> list[tuple[int, float, float, float]]:
    """[(batch size, decode tokens/s, ms per step, median ms per step)], every request `context`
    tokens deep. Tokens/s and ms come from the fastest of `steps` timed steps (other work on a
    shared machine only ever slows a step down); the median is there to show the spread."""
    from backends.base import SamplingParams
    from backends.engines.api import EngineRequest

    gen = torch.Generator().manual_seed(1)
    rows = []
    for b in batch_sizes:
        if b > engine.max_batch:
            break
        # Enough tokens that nobody finishes while we time (prompts may prefill over several
        # steps, so requests start decoding at different steps); the rest is aborted after.
        params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 16, ignore_eos=True)
        ids = [f"bench-{b}-{i}" for i in range(b)]
        for rid in ids:
            prompt = torch.randint(3, engine.model.vocab_size, (context,), generator=gen).tolist()
            engine.add_request(EngineRequest(rid, prompt, params))
        # Prefill everything (and take one decode step), then time pure decode steps.
        while any(not s.in_decode for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        engine.step()
        times = []
        for _ in range(steps):
            assert len(engine.scheduler.running) == b
            _sync(engine.device)
            t0 = time.perf_counter()
            engine.step()
            _sync(engine.device)
            times.append(time.perf_counter() - t0)
        dt = min(times)
        rows.append((b, b / dt, dt * 1000.0, statistics.median(times) * 1000.0))
        for rid in ids:
            engine.abort(rid)
    return rows


def check_knee(cached: ProfileResult, fresh: ProfileResult) -> tuple[bool, str]:
    """Does the cached knee still hold against a fresh measurement? Yes when the fresh knee is
    within one doubling of it (the sweep's own resolution) and both found a knee."""
    if not fresh.knee_found:
        return False, f"the fresh sweep found no knee within range (still rising at {fresh.knee})"
    if not cached.knee_found:
        return False, f"the cached profile had no knee; the fresh one is at {fresh.knee}"
    ratio = fresh.knee / cached.knee
    if 0.5 <= ratio <= 2.0:
        return True, f"cached knee {cached.knee} holds (fresh knee {fresh.knee})"
    return False, f"cached knee {cached.knee} no longer holds: the fresh knee is {fresh.knee}"
