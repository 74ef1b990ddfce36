"""The GPU timing tables the simulator needs, shipped with the package (``gpu_tables.json``).

``gpu_model`` needs, per (GPU, model, TP), the non-attention per-layer time table ``lin(N)`` and,
per node type, two network curves (TP all-reduce, KV send/recv). They are reduced from the Vidur
measurements in ``shared/data/vidur-profiling`` (median per token count / message size), which an
installed package does not have, so the reduced tables travel with the code: ~100 KB of JSON
instead of ~15 MB of CSV. ``TETRI_VIDUR_DIR`` still points the simulator at the raw CSVs.

Regenerate after the data changes (a test checks the shipped file against the CSVs when they are
present)::

    python -m backends.engines.simulated.shipped [--data DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from backends.engines.simulated.timing import (
    GPUS,
    MODELS,
    TABLES_PATH,
    LinTable,
    NetCurve,
    _read_csv,
    data_root,
    lin_key,
    net_key,
    shipped_tables,
)

__all__ = ["TABLES_PATH", "build_tables", "lin_key", "net_key", "shipped_tables"]
# KV send/recv between two GPUs: devices_per_node 1 = across nodes, 2 = NVLink inside one node.
SEND_RECV_LAYOUTS = ((2, 1), (2, 2))


def _round(xs: Any, digits: int = 6) -> list[float]:
    return [float(f"{float(x):.{digits}g}") for x in xs]


def build_tables(root: Path) -> dict[str, Any]:
    """Reduce the Vidur CSVs under ``root`` to the tables ``gpu_model`` reads."""
    lin: dict[str, Any] = {}
    net: dict[str, Any] = {}
    for gpu, spec in GPUS.items():
        node = spec["node"]
        for key, shape in MODELS.items():
            mlp = root / "compute" / gpu / shape.hf_path / "mlp.csv"
            if not mlp.exists():
                continue
            tps = sorted({int(r["num_tensor_parallel_workers"]) for r in _read_csv(str(mlp))})
            for tp in tps:
                t = LinTable.from_mlp_csv(mlp, tp)
                lin[lin_key(gpu, key, tp)] = {"tokens": _round(t.tokens), "ms": _round(t.ms), "tail": _round(t.tail)}
                if tp > 1:
                    c = NetCurve.from_csv(root / "network" / node / "all_reduce.csv", "all_reduce", tp, tp)
                    net[net_key(node, "all_reduce", tp, tp)] = _curve(c)
        for workers, dpn in SEND_RECV_LAYOUTS:
            c = NetCurve.from_csv(root / "network" / node / "send_recv.csv", "send_recv", workers, dpn)
            net[net_key(node, "send_recv", workers, dpn)] = _curve(c)
    return {"source": "shared/data/vidur-profiling (median per point)", "lin": lin, "net": net}


def _curve(c: Any) -> dict[str, Any]:
    return {"sizes": _round(c.sizes), "ms": _round(c.ms), "bw": float(f"{c.bw:.6g}")}


def main() -> None:  # pragma: no cover - maintenance command
    ap = argparse.ArgumentParser(description=f"Regenerate {TABLES_PATH.name} (beside this module) from the Vidur CSVs.")
    ap.add_argument("--data", type=Path, default=None, help="vidur-profiling folder (default: the shared checkout)")
    a = ap.parse_args()
    root = a.data or data_root()
    tables = build_tables(root)
    TABLES_PATH.write_text(json.dumps(tables, separators=(",", ":")) + "\n")
    print(f"wrote {TABLES_PATH} ({TABLES_PATH.stat().st_size // 1024} KiB): "
          f"{len(tables['lin'])} lin tables, {len(tables['net'])} network curves")  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    main()
