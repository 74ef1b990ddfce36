"""The orchestrator's own tokenizer: it needs prompt lengths for SJF, heavy/light classes and the
predictor before any engine sees the request."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from backends.native.model_source import DEFAULT_MODEL, default_tokenizer_dir


@functools.lru_cache(maxsize=8)
def load_tokenizer(model: str = DEFAULT_MODEL) -> Any:
    """Tokenizer (with chat template) for a model spec: the default GGUF and `random:*` shapes (which
    borrow the default tokenizer) from the engine's cached copy, a .gguf file, or a local Hugging
    Face directory."""
    from transformers import AutoTokenizer

    if model == DEFAULT_MODEL or model.startswith("random:"):
        return AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    path = Path(model)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(model)


class PromptBuilder:
    """Chat templating and tokenization for one served model."""

    def __init__(self, model: str) -> None:
        self.tokenizer = load_tokenizer(model)

    def chat(self, messages: list[dict[str, Any]]) -> tuple[str, list[int]]:
        """The templated prompt and its token ids (rendered once, then encoded without extra
        special tokens, which is what `apply_chat_template(tokenize=True)` does)."""
        text = str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return text, self.text_ids(text)

    def text_ids(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]
