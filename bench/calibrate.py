"""Calibrate the ``cpu-smollm2`` timing profile from measured forward passes of an EngineCore.

Only the EngineCore protocol is used (add_request / step / abort), so the same routine measures the
built-in engine (``NativeEngine``) or, as a self-check, a ``SimEngine`` (it recovers the profile it
runs). Measured passes:

* prefill: one prompt of N tokens per pass (N up to the engine's chunk size), and packed chunks;
* decode: B running requests at context C (after their prefill), several passes each.

Each pass gives (ms, prefill tokens, Σ(c²+2ck), Σctx, sequences); ``fit_linear`` fits
``iter_ms = base + tok·N + unit·U + ctx·C + seq·S`` by relative least squares.

``calibrate_from_workers(urls)`` fits the same model to the passes *running* workers logged while they
served real traffic (``GET /passes``): the machine's speed at that minute, with the serving stack's
own per-pass costs (sampling, detokenization, the HTTP relay competing for the cores) included.
"""

from __future__ import annotations

import time
from typing import Any

from backends.base import SamplingParams
from backends.engines.api import EngineRequest
from backends.engines.simulated.profiles import fit_linear, predict_ms, save_cpu_profile

PREFILL_SIZES = (16, 32, 64, 128, 256)
DECODE_POINTS = ((1, 64), (4, 64), (4, 256), (16, 64), (8, 256))


def _prompt(n: int, salt: int) -> list[int]:
    return [100 + (salt * 131 + i * 7) % 20000 for i in range(n)]


def measure_core(
    core: Any,
    prefill_sizes: tuple[int, ...] = PREFILL_SIZES,
    decode_points: tuple[tuple[int, int], ...] = DECODE_POINTS,
    decode_passes: int = 4,
    repeats: int = 2,
) -> list[dict[str, float]]:
    samples: list[dict[str, float]] = []
    salt = 0
    chunk = int(getattr(core, "chunk_size", 512))
    for n in prefill_sizes:
        n = min(n, chunk)
        for _ in range(repeats):
            salt += 1
            rid = f"cal-p{salt}"
            core.add_request(EngineRequest(rid, _prompt(n, salt), SamplingParams(max_tokens=2, ignore_eos=True,
                                                                                 temperature=0.0)))  # fmt: skip
            t = time.perf_counter()
            core.step()
            ms = (time.perf_counter() - t) * 1e3
            samples.append({"ms": ms, "tokens": n, "units": float(n * n), "ctx": 0.0, "seqs": 1.0, "dseqs": 0.0})
            core.abort(rid)
    for b, ctx in decode_points:
        ids = []
        for _ in range(b):
            salt += 1
            rid = f"cal-d{salt}"
            ids.append(rid)
            sp = SamplingParams(max_tokens=decode_passes + 8, ignore_eos=True, temperature=0.0)
            core.add_request(EngineRequest(rid, _prompt(ctx, salt), sp))
        # run the prefills (chunked or whole) until every request has its first token
        seen: set[str] = set()
        guard = 0
        while len(seen) < b and guard < 10 * b + 50:
            for o in core.step():
                seen.add(o.request_id)
            guard += 1
        for k in range(decode_passes):
            t = time.perf_counter()
            core.step()
            ms = (time.perf_counter() - t) * 1e3
            samples.append({"ms": ms, "tokens": 0.0, "units": 0.0, "ctx": float(b * (ctx + 1 + k)), "seqs": 0.0,
                            "dseqs": float(b)})  # fmt: skip
        for rid in ids:
            core.abort(rid)
    return samples


def calibrate_cpu(save: bool = True, core: Any = None, path: Any = None) -> dict[str, Any]:
    if core is None:
        from backends.engines.native.engine import NativeEngine

        core = NativeEngine(role="colocated", batching="sarathi", chunk_size=512)
    info = core.info() if hasattr(core, "info") else {}
    return _fit_and_save(measure_core(core), info, save, path)


def worker_passes(url: str, since: float = 0.0, timeout_s: float = 10.0) -> tuple[list[dict[str, float]], dict]:
    """The forward passes a running worker logged after ``since`` (unix time), and its /info."""
    import httpx

    base = url.rstrip("/")
    with httpx.Client(timeout=timeout_s) as client:
        passes = client.get(f"{base}/passes", params={"since": since}).raise_for_status().json()["passes"]
        info = client.get(f"{base}/info").raise_for_status().json()
    return passes, info


def calibrate_from_workers(
    urls: list[str], since: float = 0.0, save: bool = True, path: Any = None
) -> dict[str, Any]:
    """One profile from the passes of several workers (e.g. a deployment's prefill and decode)."""
    samples: list[dict[str, float]] = []
    info: dict = {}
    for url in urls:
        passes, info = worker_passes(url, since)
        samples += passes
    coeffs = _fit_and_save(samples, info, save, path)
    coeffs["source_urls"] = urls
    return coeffs


def _fit_and_save(samples: list[dict[str, float]], info: dict, save: bool, path: Any) -> dict[str, Any]:
    coeffs: dict[str, Any] = fit_linear(samples)
    if info.get("total_kv_tokens"):
        coeffs["total_kv_tokens"] = int(info["total_kv_tokens"])
    if info.get("max_context"):
        coeffs["max_context"] = int(info["max_context"])
    errs = [abs(predict_ms(coeffs, s) - s["ms"]) / max(s["ms"], 1e-6) for s in samples]
    coeffs["fit_mean_abs_rel_error"] = sum(errs) / len(errs)
    coeffs["samples"] = len(samples)
    coeffs["measured_at"] = time.time()
    if save:
        coeffs["path"] = str(save_cpu_profile({k: v for k, v in coeffs.items() if k != "path"}, path))
    return coeffs
