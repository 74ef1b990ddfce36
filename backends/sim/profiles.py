"""Named timing profiles: ``<gpu>-<model>`` from the Vidur measurements, and ``cpu-smollm2`` for the
built-in engine on this machine.

``cpu-smollm2`` is a ``LinearTimingModel``. Its coefficients come, in order of preference, from

1. ``$TETRI_SIM_CPU_PROFILE`` or ``cache_dir()/sim/cpu-smollm2.json`` (written by
   ``calibrate_cpu()`` / ``tetri bench calibrate`` from measured forward passes),
2. the native engine's cached profile (``backends.native.profile``), when it has a usable curve,
3. the defaults below, measured on the 2-core development container with SmolLM2-135M (fp32
   PyTorch, 2 threads): see docs/benchmarks.md "Simulator and comparisons".
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from backends.sim.timing import GPUS, MODELS, LinearTimingModel, TimingModel, gpu_model

log = logging.getLogger(__name__)

# (gpu, model) pairs with mlp.csv data in shared/data/vidur-profiling.
GPU_PROFILES = {
    f"{g}-{m}": (g, m)
    for g in GPUS
    for m in MODELS
    if not (g == "h100" and m == "llama-3-8b")  # no H100 Llama-3-8B measurements exist
}
CPU_PROFILES = ("cpu-smollm2",)

# SmolLM2-135M-Instruct: 30 layers, 3 KV heads, head dim 64, fp32 KV in the built-in engine.
SMOLLM2_KV_BYTES = 30 * 2 * 3 * 64 * 4

# Measured defaults (see module doc). iter_ms = base + tok·N + unit·Σ(c²+2ck) + ctx·Σctx + seq·seqs
CPU_DEFAULT = {
    "base_ms": 9.0,
    "per_token_ms": 0.13,
    "per_unit_ms": 1.0e-5,
    "per_ctx_ms": 2.0e-3,
    "per_seq_ms": 0.25,
    "total_kv_tokens": 32768,
    "max_context": 8192,
    "link_gbps": 0.5,
    "link_latency_ms": 3.0,
}


def profile_names() -> list[str]:
    return sorted(GPU_PROFILES) + list(CPU_PROFILES)


def cpu_profile_path() -> Path:
    env = os.environ.get("TETRI_SIM_CPU_PROFILE")
    if env:
        return Path(env)
    try:
        from orchestrator.config import cache_dir

        root = cache_dir()
    except Exception:  # pragma: no cover
        root = Path.home() / ".cache" / "tetri"
    return root / "sim" / "cpu-smollm2.json"


def _native_curve() -> dict[str, Any] | None:
    """Coefficients from the native engine's cached profile, if it exposes a fitted curve."""
    try:
        from backends.native import profile as nprof  # type: ignore[attr-defined]
    except Exception:
        return None
    for fn in ("sim_coefficients", "load_cached_profile", "cached_profile", "load_profile"):
        f = getattr(nprof, fn, None)
        if f is None:
            continue
        try:
            data = f()
        except Exception:
            continue
        if isinstance(data, dict) and "per_token_ms" in data and "base_ms" in data:
            return data
        if hasattr(data, "__dict__") and hasattr(data, "per_token_ms"):
            return dict(vars(data))
    return None


def cpu_model(kv_tokens: int | None = None, **overrides: Any) -> LinearTimingModel:
    coeffs = dict(CPU_DEFAULT)
    source = "built-in default (measured on the dev container)"
    path = cpu_profile_path()
    native = None
    if path.exists():
        try:
            coeffs.update({k: v for k, v in json.loads(path.read_text()).items() if k in CPU_DEFAULT})
            source = str(path)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable CPU profile %s: %s", path, exc)
    else:
        native = _native_curve()
        if native:
            coeffs.update({k: v for k, v in native.items() if k in CPU_DEFAULT})
            source = "backends.native.profile"
    coeffs.update(overrides)
    if kv_tokens:
        coeffs["total_kv_tokens"] = kv_tokens
    return LinearTimingModel(
        name="cpu-smollm2", kv_bytes_per_token=SMOLLM2_KV_BYTES, source=source, **coeffs  # type: ignore[arg-type]
    )


def get_timing(profile: str, network: str = "inter", kv_tokens: int | None = None, **kw: Any) -> TimingModel:
    """The timing model for a profile name (see ``profile_names()``)."""
    if profile in CPU_PROFILES:
        return cpu_model(kv_tokens=kv_tokens, **kw)
    if profile not in GPU_PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(profile_names())}")
    g, m = GPU_PROFILES[profile]
    tm = gpu_model(g, m, network=network, **kw)
    if kv_tokens:
        tm.total_kv_tokens = kv_tokens
    return tm


def fit_linear(samples: list[dict[str, float]]) -> dict[str, float]:
    """Least-squares fit of iter_ms = base + tok·N + unit·U + ctx·C + seq·S to measured passes
    (dicts with keys ms, tokens, units, ctx, seqs); negative coefficients are clipped to 0."""
    import numpy as np

    if len(samples) < 5:
        raise ValueError("need at least 5 measured passes to fit the CPU profile")
    a = np.array([[1.0, s["tokens"], s["units"], s["ctx"], s["seqs"]] for s in samples])
    y = np.array([s["ms"] for s in samples])
    w = 1.0 / np.maximum(y, 1e-3)  # relative error
    coef, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
    coef = np.maximum(coef, 0.0)
    names = ("base_ms", "per_token_ms", "per_unit_ms", "per_ctx_ms", "per_seq_ms")
    return {n: float(c) for n, c in zip(names, coef, strict=True)}


def save_cpu_profile(coeffs: dict[str, float], path: Path | None = None) -> Path:
    path = path or cpu_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coeffs, indent=2))
    return path
