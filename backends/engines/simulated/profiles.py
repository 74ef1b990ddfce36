"""Named timing profiles: ``<gpu>-<model>`` from the Vidur measurements, and ``cpu-smollm2`` for the
built-in engine on this machine.

``cpu-smollm2`` is a ``LinearTimingModel``. Its coefficients come, in order of preference, from

1. ``$TETRI_SIM_CPU_PROFILE`` or ``cache_dir()/sim/cpu-smollm2.json`` (written by
   ``calibrate_cpu()`` / ``tetri bench calibrate`` from measured forward passes),
2. the native engine's cached profile (``backends.engines.native.profile``), when it has a usable curve,
3. the defaults below, measured on the 2-core development container with SmolLM2-135M (fp32
   PyTorch, 2 threads): see docs/benchmarks.md "Simulator and comparisons".
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from backends.engines.simulated.timing import GPUS, MODELS, LinearTimingModel, TimingModel, gpu_model

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

# Defaults fitted to the built-in engine's measurements in docs/benchmarks.md ("Built-in engine":
# prefill tokens/s per pass size, decode ms per step by batch at context 128; 2 shared EPYC cores,
# loaded machine). iter_ms = base + tok·N + unit·Σ(c²+2ck) + seq·prefill_seqs + dec·B + ctx·Σctx.
CPU_DEFAULT = {
    "base_ms": 180.0,
    "per_token_ms": 5.6,
    "per_unit_ms": 2.5e-3,
    "per_ctx_ms": 0.07,
    "per_seq_ms": 0.0,
    "per_decode_ms": 8.0,
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
    # cache_dir()'s rule (orchestrator/config.py), read here: the worker side never imports orchestrator/
    root = Path(os.environ.get("TETRI_CACHE_DIR", Path.home() / ".cache" / "tetri"))
    return root / "sim" / "cpu-smollm2.json"


def _native_prefill_curve() -> dict[str, float] | None:
    """Prefill coefficients from the native engine's cached knee profile (tokens/s per pass size),
    when one exists for this machine: fits base + tok·N + unit·N² to its curve."""
    try:
        from backends.engines.native.profile import load_cached

        prof = load_cached("smollm2-135m-instruct", "cpu")
    except Exception:
        return None
    if prof is None or len(prof.curve) < 4:
        return None
    import numpy as np

    pack = int(getattr(prof, "pack_prompt_tokens", 512) or 512)
    rows, ys = [], []
    for n, tps in prof.curve:
        seqs = -(-n // pack)
        units = sum(min(pack, n - pack * k) ** 2 for k in range(seqs))
        rows.append([1.0, n, units])
        ys.append(n / tps * 1e3)
    a, y = np.array(rows, dtype=float), np.array(ys)
    w = 1.0 / y
    sol, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
    if (sol < 0).any():
        return None
    return {"base_ms": float(sol[0]), "per_token_ms": float(sol[1]), "per_unit_ms": float(sol[2]),
            "knee": int(prof.knee)}  # fmt: skip


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
        native = _native_prefill_curve()
        if native:
            coeffs.update({k: v for k, v in native.items() if k in CPU_DEFAULT})
            source = "backends.engines.native.profile (prefill curve) + documented decode defaults"
    coeffs.update(overrides)
    if kv_tokens:
        coeffs["total_kv_tokens"] = kv_tokens
    tm = LinearTimingModel(
        name="cpu-smollm2",
        kv_bytes_per_token=SMOLLM2_KV_BYTES,
        source=source,
        **coeffs,  # type: ignore[arg-type]
    )
    if native and native.get("knee"):
        tm.knee_tokens = int(native["knee"])  # the engine's own measured knee (its --chunk-size auto)
    return tm


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


FIT_NAMES = ("base_ms", "per_token_ms", "per_unit_ms", "per_seq_ms", "per_decode_ms", "per_ctx_ms")


def fit_linear(samples: list[dict[str, float]]) -> dict[str, float]:
    """Non-negative least-squares fit (relative error) of the linear iteration model to measured
    passes: dicts with ms, tokens (prefill), units, seqs (prefill), dseqs (decode batch), ctx."""
    import numpy as np

    if len(samples) < 6:
        raise ValueError("need at least 6 measured passes to fit the CPU profile")
    a = np.array([[1.0, s["tokens"], s["units"], s.get("seqs", 0.0), s.get("dseqs", 0.0), s["ctx"]] for s in samples])
    y = np.array([s["ms"] for s in samples])
    w = 1.0 / np.maximum(y, 1e-3)
    aw, yw = a * w[:, None], y * w
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    for _ in range(a.shape[1]):  # drop negative coefficients one at a time (tiny NNLS)
        sol, *_ = np.linalg.lstsq(aw[:, active], yw, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return {n: float(c) for n, c in zip(FIT_NAMES, coef, strict=True)}


def predict_ms(coeffs: dict[str, float], s: dict[str, float]) -> float:
    return (
        coeffs.get("base_ms", 0.0) + coeffs.get("per_token_ms", 0.0) * s["tokens"]
        + coeffs.get("per_unit_ms", 0.0) * s["units"] + coeffs.get("per_seq_ms", 0.0) * s.get("seqs", 0.0)
        + coeffs.get("per_decode_ms", 0.0) * s.get("dseqs", 0.0) + coeffs.get("per_ctx_ms", 0.0) * s["ctx"]
    )  # fmt: skip


def save_cpu_profile(coeffs: dict[str, float], path: Path | None = None) -> Path:
    path = path or cpu_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coeffs, indent=2))
    return path
