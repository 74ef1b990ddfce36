"""Iteration-time model of an LLM engine, calibrated from measured profiles.

One forward pass ("iteration") of a continuous-batching engine is described by aggregates that the
schedulers keep incrementally (so the simulator never loops over a batch):

* ``prefill_tokens``   Σ c_i, new prompt tokens in the pass (chunks of one or more prompts)
* ``prefill_units``    Σ (c_i² + 2·c_i·k_i), the causal-attention work of chunk c_i over k_i cached tokens
* ``prefill_seqs``     number of prompts (chunks) in the pass
* ``decode_seqs``      B, one token each
* ``decode_ctx``       Σ context length of the decoding sequences (KV tokens read by decode attention)

GPU profiles (``GpuTimingModel``) follow Vidur's decomposition (see
``shared/data/vidur-profiling/README.md`` §4)::

    T = L · [ lin(⌈N⌉₈) + A_pf + A_dec + 2·TPcomm(N) ] + T_head + T_cpu

* ``lin(N)``: sum of the nine non-attention per-layer ops of ``mlp.csv`` (median columns, TP shard,
  duplicate rows averaged), looked up piecewise-linearly on the profiled grid (exact at the profiled
  points, so the tile sawtooth is kept), linear least-squares extrapolation past the last point.
* ``A_pf`` (estimate: no H100 ``attention.csv`` exists here): the A100 Llama-2-7B fit
  ``0.0149·seqs + 8.97e-5·Σc + 1.41e-7·Σ(c²+2ck)`` ms per layer (from the README's 13 A100 rows), scaled
  by the attention width per GPU (q heads · head dim / TP ÷ 4096) and, on H100, by 0.45 (middle of
  the 0.30-0.61 H100/A100 range derived from the GEMM rows).
* ``A_dec`` (estimate): ``0.012 + bytes / BW`` ms per layer, bytes = Σctx · 2 · kv_heads/TP · head_dim · 2;
  BW fitted to the three A100 decode rows (1.97 TB/s effective at batch 128), H100 ×1/0.62.
  GQA models pay ×1.1 when B > 1 (as Vidur).
* ``TPcomm``: all-reduce of N·hidden·2 bytes from ``network/<node>/all_reduce.csv`` + 0.02 ms launch.
* ``T_head``: LM head weight streaming (vocab·hidden·2 bytes / HBM bandwidth) and ``T_cpu`` a fixed
  per-iteration scheduler/launch overhead (``cpu_overhead_ms``, default 1.0 ms; Vidur leaves both out).

``LinearTimingModel`` is the same interface with five coefficients, used for the CPU engine.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

LIN_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)

# A100 Llama-2-7B attention fits (ms per layer), see module docstring and the data README §5.
A100_PF_A = 0.0149
A100_PF_B = 8.97e-5
A100_PF_C = 1.41e-7  # per N² for a whole prompt of N tokens; chunk units c²+2ck have the same scale
A100_DEC_T0 = 0.012
A100_DEC_BW = 1.97e12  # bytes/s effective, batch 128 row
A100_DEC_BW_SMALL = 0.84e12  # batch 1 row (16 MiB read in 0.020 ms)
H100_PF_RATIO = 0.45
H100_DEC_RATIO = 0.62


def data_root() -> Path:
    """Where the raw vidur-profiling CSVs live (TETRI_VIDUR_DIR, else the shared checkout). The simulator
    normally reads the reduced tables shipped in ``gpu_tables.json`` instead (``shipped.py``)."""
    env = os.environ.get("TETRI_VIDUR_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "shared" / "data" / "vidur-profiling"
        if cand.is_dir():
            return cand
        cand = parent.parent / "shared" / "data" / "vidur-profiling"
        if cand.is_dir():
            return cand
    return Path("/work/shared/data/vidur-profiling")


class TimingModel:
    """Interface: iteration time in seconds from batch aggregates."""

    name: str = "abstract"
    kv_bytes_per_token: int = 0  # whole model (all layers, all TP shards)
    total_kv_tokens: int = 0
    max_context: int = 4096

    def iter_s(
        self,
        prefill_tokens: int = 0,
        prefill_units: float = 0.0,
        prefill_seqs: int = 0,
        decode_seqs: int = 0,
        decode_ctx: int = 0,
    ) -> float:
        raise NotImplementedError

    # --- conveniences -------------------------------------------------------------------------
    def prefill_s(self, tokens: int, cached: int = 0) -> float:
        return self.iter_s(tokens, tokens * tokens + 2.0 * tokens * cached, 1, 0, 0)

    def decode_s(self, batch: int, mean_ctx: float) -> float:
        return self.iter_s(0, 0.0, 0, batch, int(batch * mean_ctx))

    def transfer_s(self, tokens: int) -> float:
        return 0.0

    knee_tokens: int | None = None  # a measured knee overrides the model's

    def knee(self, step: int = 128, limit: int | None = None, tol: float = 0.05) -> int:
        """Smallest prefill size (multiple of `step`) whose tokens/s is within `tol` of every larger
        size's: tput(N) >= max_{M>N} tput(M) / (1 + tol). The ChunkSize of TetriInfer."""
        if self.knee_tokens:
            return self.knee_tokens
        limit = limit or min(self.max_context, 4096)
        sizes = list(range(step, limit + 1, step))
        tput = [n / self.prefill_s(n) for n in sizes]
        best_after = 0.0
        knee = sizes[-1]
        for i in range(len(sizes) - 1, -1, -1):
            if tput[i] * (1 + tol) >= best_after:
                knee = sizes[i]
            best_after = max(best_after, tput[i])
        return knee

    def describe(self) -> dict:
        return {"name": self.name}


@cache
def _read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _lstsq_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    a = np.vstack([np.ones_like(x), x]).T
    (c0, c1), *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(c0), float(c1)


@dataclass
class LinTable:
    """Per-layer non-attention time lin(N) (ms), piecewise linear on the profiled grid."""

    tokens: np.ndarray
    ms: np.ndarray
    tail: tuple[float, float]  # extrapolation line (intercept, slope) past the grid
    per_op_fit: dict[str, tuple[float, float]] = field(default_factory=dict)
    table: np.ndarray | None = None

    def __post_init__(self) -> None:
        top = int(self.tokens[-1])
        grid = np.arange(0, top + 9)
        self.table = np.interp(grid, self.tokens, self.ms)

    def __call__(self, n: int) -> float:
        if n <= 0:
            return 0.0
        n = -(-n // 8) * 8
        table = self.table
        if n < len(table):
            return float(table[n])
        return self.tail[0] + self.tail[1] * n

    @classmethod
    def from_mlp_csv(cls, path: Path, tp: int) -> LinTable:
        rows = [r for r in _read_csv(str(path)) if int(r["num_tensor_parallel_workers"]) == tp]
        if not rows:
            raise ValueError(f"{path} has no rows for TP={tp}")
        by_n: dict[int, list[dict[str, float]]] = {}
        for r in rows:
            vals = {}
            for op in LIN_OPS:
                v = r.get(f"time_stats.{op}.median", "")
                vals[op] = float(v) if v not in ("", None) else 0.0
            by_n.setdefault(int(r["num_tokens"]), []).append(vals)
        ns = sorted(by_n)
        per_op = {op: np.array([np.mean([v[op] for v in by_n[n]]) for n in ns]) for op in LIN_OPS}
        total = sum(per_op.values())
        x = np.array(ns, dtype=float)
        top = x >= x[-1] * 0.5
        tail = _lstsq_line(x[top], total[top])
        fits = {op: _lstsq_line(x, per_op[op]) for op in LIN_OPS}
        return cls(tokens=x, ms=np.asarray(total, dtype=float), tail=tail, per_op_fit=fits)


@dataclass
class NetCurve:
    """Collective time (ms) vs message bytes: log-log interpolation, linear extrapolation above."""

    sizes: np.ndarray
    ms: np.ndarray
    bw: float  # bytes/ms of the largest messages (for extrapolation)

    def __call__(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        if nbytes <= self.sizes[0]:
            return float(self.ms[0])
        if nbytes >= self.sizes[-1]:
            return float(self.ms[-1] + (nbytes - self.sizes[-1]) / self.bw)
        return float(np.exp(np.interp(np.log(nbytes), np.log(self.sizes), np.log(self.ms))))

    @classmethod
    def from_csv(cls, path: Path, op: str, num_workers: int, devices_per_node: int) -> NetCurve:
        rows = [
            r
            for r in _read_csv(str(path))
            if int(r["num_workers"]) == num_workers and int(r["devices_per_node"]) == devices_per_node
        ]
        if not rows:
            raise ValueError(f"{path}: no rows for workers={num_workers} devices_per_node={devices_per_node}")
        by: dict[int, list[float]] = {}
        for r in rows:
            by.setdefault(int(r["size"]), []).append(float(r[f"time_stats.{op}.median"]))
        sizes = np.array(sorted(by), dtype=float)
        ms = np.array([np.mean(by[int(s)]) for s in sizes])
        ms = np.maximum.accumulate(ms)  # monotone
        k = max(2, len(sizes) // 4)
        bw = (sizes[-1] - sizes[-k]) / max(ms[-1] - ms[-k], 1e-9)
        return cls(sizes=sizes, ms=ms, bw=float(bw))


@dataclass(frozen=True)
class ModelShape:
    key: str
    hf_path: str  # folder under compute/<gpu>/
    layers: int
    n_head: int
    n_kv_head: int
    hidden: int
    mlp_hidden: int
    vocab: int
    params_b: float
    max_context: int
    default_tp: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.layers * 2 * self.n_kv_head * self.head_dim * dtype_bytes


MODELS: dict[str, ModelShape] = {
    m.key: m
    for m in [
        ModelShape("llama-2-7b", "meta-llama/Llama-2-7b-hf", 32, 32, 32, 4096, 11008, 32000, 6.74, 4096),
        ModelShape("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 32, 32, 8, 4096, 14336, 128256, 8.03, 8192),
        ModelShape("llama-2-70b", "meta-llama/Llama-2-70b-hf", 80, 64, 8, 8192, 28672, 32000, 68.98, 4096, 4),
        ModelShape(
            "codellama-34b", "codellama/CodeLlama-34b-Instruct-hf", 48, 64, 8, 8192, 22016, 32000, 33.7, 16384, 2
        ),
        ModelShape("qwen-72b", "Qwen/Qwen-72B", 80, 64, 64, 8192, 24576, 152064, 72.7, 8192, 4),
        ModelShape("phi-2", "microsoft/phi-2", 32, 32, 32, 2560, 10240, 51200, 2.78, 2048),
    ]
}

GPUS = {
    "h100": {"mem_gb": 80.0, "hbm_tbs": 2.8, "node": "h100_dgx"},
    "a100": {"mem_gb": 80.0, "hbm_tbs": 1.8, "node": "a100_dgx"},
}


@dataclass
class GpuTimingModel(TimingModel):
    gpu: str
    shape: ModelShape
    tp: int
    lin: LinTable
    allreduce: NetCurve | None
    kv_link: NetCurve
    network: str
    mem_util: float = 0.9
    cpu_overhead_ms: float = 1.0

    def __post_init__(self) -> None:
        s = self.shape
        self.name = f"{self.gpu}-{s.key}"
        self.max_context = s.max_context
        self.kv_bytes_per_token = s.kv_bytes_per_token()
        mem = GPUS[self.gpu]["mem_gb"] * 1e9 * self.mem_util * self.tp
        weights = s.params_b * 1e9 * 2
        self.total_kv_tokens = max(0, int((mem - weights) / self.kv_bytes_per_token))
        width = s.n_head * s.head_dim / self.tp / 4096.0
        pf_ratio = H100_PF_RATIO if self.gpu == "h100" else 1.0
        dec_ratio = H100_DEC_RATIO if self.gpu == "h100" else 1.0
        self._pf_a = A100_PF_A * pf_ratio
        self._pf_b = A100_PF_B * pf_ratio * width
        self._pf_c = A100_PF_C * pf_ratio * width
        self._dec_t0 = A100_DEC_T0 * dec_ratio
        # bytes of KV one layer reads per context token on one GPU
        self._dec_bytes = 2 * (s.n_kv_head / self.tp) * s.head_dim * 2
        self._dec_ms_per_byte = dec_ratio * 1e3 / A100_DEC_BW
        self._gqa = 1.1 if s.n_kv_head < s.n_head else 1.0
        hbm = GPUS[self.gpu]["hbm_tbs"] * 1e12
        self._head_ms = s.vocab * s.hidden * 2 / self.tp / hbm * 1e3
        self._layers = s.layers
        self._ar_cache: dict[int, float] = {}

    def _comm_ms(self, n: int) -> float:
        if self.tp <= 1 or self.allreduce is None or n <= 0:
            return 0.0
        v = self._ar_cache.get(n)
        if v is None:
            v = 2.0 * (self.allreduce(n * self.shape.hidden * 2) + 0.02)
            if len(self._ar_cache) < 100000:
                self._ar_cache[n] = v
        return v

    def iter_s(self, prefill_tokens=0, prefill_units=0.0, prefill_seqs=0, decode_seqs=0, decode_ctx=0):
        n = prefill_tokens + decode_seqs
        if n <= 0:
            return 0.0
        per_layer = self.lin(n) + self._comm_ms(n)
        if prefill_tokens:
            per_layer += self._pf_a * prefill_seqs + self._pf_b * prefill_tokens + self._pf_c * prefill_units
        if decode_seqs:
            dec = self._dec_t0 + decode_ctx * self._dec_bytes * self._dec_ms_per_byte
            if decode_seqs > 1:
                dec *= self._gqa
            per_layer += dec
        ms = self._layers * per_layer + self._head_ms + self.cpu_overhead_ms
        return ms * 1e-3

    def transfer_s(self, tokens: int) -> float:
        return self.kv_link(tokens * self.kv_bytes_per_token) * 1e-3

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": "gpu",
            "gpu": self.gpu,
            "model": self.shape.key,
            "tp": self.tp,
            "total_kv_tokens": self.total_kv_tokens,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "network": self.network,
            "kv_link_gbps": round(self.kv_link.bw * 1e3 / 1e9, 1),
            "cpu_overhead_ms": self.cpu_overhead_ms,
            "knee": self.knee(),
            "prefill_512_ms": round(self.prefill_s(512) * 1e3, 2),
            "prefill_2048_ms": round(self.prefill_s(2048) * 1e3, 2),
            "decode_b1_ctx1024_ms": round(self.decode_s(1, 1024) * 1e3, 2),
            "decode_b32_ctx1024_ms": round(self.decode_s(32, 1024) * 1e3, 2),
            "decode_b128_ctx1024_ms": round(self.decode_s(128, 1024) * 1e3, 2),
            "estimates": "attention terms are estimates (no H100 attention.csv); lin terms measured",
        }


@dataclass
class LinearTimingModel(TimingModel):
    """iter = base + tok·N_prefill + unit·Σ(c²+2ck) + seq·prefill_seqs + dec·B + ctx·Σctx, all in ms."""

    name: str = "linear"
    base_ms: float = 0.0
    per_token_ms: float = 0.0
    per_unit_ms: float = 0.0
    per_ctx_ms: float = 0.0
    per_seq_ms: float = 0.0
    per_decode_ms: float = 0.0
    total_kv_tokens: int = 0
    kv_bytes_per_token: int = 0
    max_context: int = 8192
    link_gbps: float = 1.0  # loopback HTTP on this machine, bytes/ns
    link_latency_ms: float = 2.0
    source: str = "default"

    def knee(self, step: int = 32, limit: int | None = 1024, tol: float = 0.05) -> int:
        # A CPU engine's prompts are short: a finer grid than the GPU default, and the same one for the
        # cluster simulator, the SimEngine worker and the split planner (they must agree on ChunkSize).
        return super().knee(step, limit, tol)

    def iter_s(self, prefill_tokens=0, prefill_units=0.0, prefill_seqs=0, decode_seqs=0, decode_ctx=0):
        n = prefill_tokens + decode_seqs
        if n <= 0:
            return 0.0
        ms = (
            self.base_ms
            + self.per_token_ms * prefill_tokens
            + self.per_unit_ms * prefill_units
            + self.per_seq_ms * prefill_seqs
            + self.per_decode_ms * decode_seqs
            + self.per_ctx_ms * decode_ctx
        )
        return ms * 1e-3

    def transfer_s(self, tokens: int) -> float:
        return (self.link_latency_ms + tokens * self.kv_bytes_per_token / (self.link_gbps * 1e9) * 1e3) * 1e-3

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": "linear",
            "source": self.source,
            "base_ms": self.base_ms,
            "per_token_ms": self.per_token_ms,
            "per_unit_ms": self.per_unit_ms,
            "per_ctx_ms": self.per_ctx_ms,
            "per_seq_ms": self.per_seq_ms,
            "per_decode_ms": self.per_decode_ms,
            "total_kv_tokens": self.total_kv_tokens,
            "knee": self.knee(),
            "prefill_256_ms": round(self.prefill_s(256) * 1e3, 2),
            "decode_b8_ctx256_ms": round(self.decode_s(8, 256) * 1e3, 2),
        }


def gpu_model(gpu: str, model: str, tp: int | None = None, network: str = "inter", **kw) -> GpuTimingModel:
    """Build a calibrated GPU timing model. network: 'inter' (KV crosses nodes) or 'intra' (NVLink)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    shape = MODELS[model]
    tp = tp or shape.default_tp
    dpn = 1 if network == "inter" else 2
    tables = None if os.environ.get("TETRI_VIDUR_DIR") else _shipped(gpu, shape, tp, dpn)
    lin, ar, link = tables or _from_csv(gpu, shape, tp, dpn)
    return GpuTimingModel(gpu=gpu, shape=shape, tp=tp, lin=lin, allreduce=ar, kv_link=link, network=network, **kw)


Tables = tuple[LinTable, NetCurve | None, NetCurve]

# The reduced tables shipped with the package (shipped.py builds them from the Vidur CSVs).
TABLES_PATH = Path(__file__).with_name("gpu_tables.json")


def lin_key(gpu: str, model: str, tp: int) -> str:
    return f"{gpu}/{model}/tp{tp}"


def net_key(node: str, op: str, workers: int, devices_per_node: int) -> str:
    return f"{node}/{op}/w{workers}/d{devices_per_node}"


@cache
def shipped_tables() -> dict:
    return json.loads(TABLES_PATH.read_text())


def _shipped(gpu: str, shape: ModelShape, tp: int, dpn: int) -> Tables | None:
    """The reduced tables shipped in gpu_tables.json, or None for a (GPU, model, TP) they lack."""
    t = shipped_tables()
    node = GPUS[gpu]["node"]
    lin = t["lin"].get(lin_key(gpu, shape.key, tp))
    ar = t["net"].get(net_key(node, "all_reduce", tp, tp)) if tp > 1 else None
    link = t["net"].get(net_key(node, "send_recv", 2, dpn))
    if lin is None or link is None or (tp > 1 and ar is None):
        return None

    def curve(c: dict) -> NetCurve:
        return NetCurve(sizes=np.array(c["sizes"]), ms=np.array(c["ms"]), bw=float(c["bw"]))

    table = LinTable(tokens=np.array(lin["tokens"]), ms=np.array(lin["ms"]), tail=(lin["tail"][0], lin["tail"][1]))
    return table, curve(ar) if ar else None, curve(link)


def _from_csv(gpu: str, shape: ModelShape, tp: int, dpn: int) -> Tables:
    root = data_root()
    mlp = root / "compute" / gpu / shape.hf_path / "mlp.csv"
    if not mlp.exists():
        raise ValueError(f"no profile for {gpu}/{shape.hf_path} at TP={tp} (not shipped; {mlp} missing)")
    lin = LinTable.from_mlp_csv(mlp, tp)
    node = GPUS[gpu]["node"]
    ar = NetCurve.from_csv(root / "network" / node / "all_reduce.csv", "all_reduce", tp, tp) if tp > 1 else None
    link = NetCurve.from_csv(root / "network" / node / "send_recv.csv", "send_recv", 2, dpn)
    return lin, ar, link
