"""The orchestrator's own tokenizer: it needs prompt lengths for SJF, heavy/light classes and the
predictor before any engine sees the request."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from backends.engines.native.model_source import DEFAULT_MODEL, default_tokenizer_dir

# Names of the built-in default model (as backends.engines.native.model_source.load_model accepts them).
_BUILTIN_NAMES = frozenset({DEFAULT_MODEL, "smollm2", "default"})


class TokenizerNotFound(LookupError):
    """No tokenizer for a source: not the built-in model, no such local file or directory, and not
    in the Hugging Face cache (while offline)."""


def is_builtin(name: str) -> bool:
    """The default model, or a `random:*` shape (which borrows its tokenizer): served from the
    cached copy, never looked up as a path."""
    return name.lower() in _BUILTIN_NAMES or name.startswith("random:")


def _hub_offline() -> bool:
    flags = (os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


@functools.lru_cache(maxsize=16)
def load_tokenizer(source: str = DEFAULT_MODEL) -> Any:
    """Tokenizer (with chat template) from a source the operator configured: the built-in model's
    cached copy (its name or `random:*`), a .gguf file, a local Hugging Face directory, or a
    Hugging Face id (the local cache first; the hub only when not offline). Blocking: callers run
    it in a thread. Raises TokenizerNotFound when there is none."""
    from transformers import AutoTokenizer

    if is_builtin(source):
        return AutoTokenizer.from_pretrained(str(default_tokenizer_dir()), local_files_only=True)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TokenizerNotFound(f"no GGUF file at {source}")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise TokenizerNotFound(f"no tokenizer directory at {source}")
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as exc:
        if _hub_offline():
            raise TokenizerNotFound(f"{source} is not in the local Hugging Face cache (offline): {exc}") from exc
    return AutoTokenizer.from_pretrained(source)


class PromptBuilder:
    """Chat templating and tokenization for one served model (`source`: see load_tokenizer)."""

    def __init__(self, source: str) -> None:
        self.tokenizer = load_tokenizer(source)
        # len() of a transformers tokenizer rebuilds its vocabulary with the added tokens: once here,
        # not per request (token-id prompts are checked against it).
        self.vocab_size = len(self.tokenizer)

    def chat(self, messages: list[dict[str, Any]]) -> tuple[str, list[int]]:
        """The templated prompt and its token ids (rendered once, then encoded without extra
        special tokens, which is what `apply_chat_template(tokenize=True)` does)."""
        text = str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return text, self.text_ids(text)

    def text_ids(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]
