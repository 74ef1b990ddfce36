"""Where the worker side caches what it builds (converted weights, chunk-size profiles, locks, the KV
channel's secret). orchestrator/config.py re-exports `cache_dir`: one rule for both sides, kept here
because the worker side never imports the orchestrator."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted weights, profiles and datasets are cached (TETRI_CACHE_DIR)."""
    path = Path(os.environ.get("TETRI_CACHE_DIR", Path.home() / ".cache" / "tetri"))
    path.mkdir(parents=True, exist_ok=True)
    return path
