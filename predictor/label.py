"""Label prompts with a running deployment's own answer lengths (the paper's method).

Each ShareGPT prompt (messages up to a user turn) is sent to an OpenAI-compatible
``/v1/chat/completions``; ``usage.completion_tokens`` is the label. Output: JSONL rows
``{"id", "messages", "completion_tokens", "prompt_tokens", "finish_reason"}`` for ``train --data``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from predictor.data import Example


def pick(examples: Sequence[Example], n: int, seed: str = "label") -> list[Example]:
    """A deterministic pseudo-random sample of ``n`` examples."""
    keyed = sorted(examples, key=lambda e: hashlib.sha1(f"{seed}:{e.id}".encode()).digest())
    return keyed[:n]


def chat_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def label_one(client: httpx.Client, url: str, example: Example, model: str, max_tokens: int,
              temperature: float) -> dict[str, Any]:
    messages = [{"role": r, "content": c} for r, c in example.messages]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    resp = client.post(chat_url(url), json=body)
    resp.raise_for_status()
    data = resp.json()
    usage = data.get("usage") or {}
    if "completion_tokens" not in usage:
        raise ValueError(f"response has no usage.completion_tokens: {str(data)[:200]}")
    choice = (data.get("choices") or [{}])[0]
    return {"id": example.id, "messages": messages, "completion_tokens": int(usage["completion_tokens"]),
            "prompt_tokens": usage.get("prompt_tokens"), "finish_reason": choice.get("finish_reason")}


def label(url: str, examples: Sequence[Example], *, model: str = "default", max_tokens: int = 1024,
          temperature: float = 0.7, concurrency: int = 4, timeout_s: float = 600.0,
          on_done: Callable[[int], None] | None = None,
          transport: httpx.BaseTransport | None = None) -> Iterator[dict[str, Any] | Exception]:
    """Yield one row (or the exception that replaced it) per example, in submission order."""
    with httpx.Client(timeout=timeout_s, transport=transport) as client, \
            ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(label_one, client, url, e, model, max_tokens, temperature) for e in examples]
        for fut in futures:
            try:
                yield fut.result()
            except Exception as exc:  # noqa: BLE001 - reported and counted by the caller
                yield exc
            if on_done:
                on_done(1)


def write_jsonl(rows: Iterator[dict[str, Any] | Exception], fh: Any) -> tuple[int, list[str]]:
    ok, errors = 0, []
    for row in rows:
        if isinstance(row, Exception):
            errors.append(str(row))
            continue
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        ok += 1
    return ok, errors
