"""Prompt parsing and cheap features: one code path for training and serving.

The orchestrator passes the chat-templated prompt string. ChatML prompts (SmolLM2, Qwen...) are split
back into messages; any other string is one user message. ``meta["messages"]`` (a list of
``{"role", "content"}``) is used instead when given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from predictor.data import Message

_CHATML = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)(?:<\|im_end\|>\n?|$)", re.S)
_WORD = re.compile(r"\w+")
_LIST = re.compile(r"^\s*(?:\d+[.)]|[-*])\s", re.M)
TEXT_CHARS = 3000  # head of the user turn read by the text model
PREV_CHARS = 1500  # head of the previous answer read by the second text model
TOKEN_ANSWERS = 3  # token counts are taken of this many latest answers (bounded serving cost)

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class Parsed:
    user: str
    history: tuple[Message, ...]  # every message before the user turn, system messages excluded
    system: str
    user_tokens: int | None = None
    history_tokens: tuple[int, ...] | None = None  # aligned with history, when known


def from_messages(messages: Sequence[Message], token_lens: Sequence[int] | None = None) -> Parsed:
    lens = list(token_lens) if token_lens is not None and len(token_lens) == len(messages) else None
    rows = [(r, c, lens[i] if lens else None) for i, (r, c) in enumerate(messages)]
    system = " ".join(c for r, c, _ in rows if r == "system")
    rest = [row for row in rows if row[0] != "system"]
    while rest and rest[-1][0] == "assistant" and not rest[-1][1].strip():
        rest.pop()  # a generation prompt's empty assistant turn
    idx = max((i for i, row in enumerate(rest) if row[0] == "user"), default=-1)
    user, user_tokens = (rest[idx][1], rest[idx][2]) if idx >= 0 else ("", 0 if lens else None)
    hist = rest[:idx] if idx >= 0 else rest
    return Parsed(user=user, history=tuple((r, c) for r, c, _ in hist), system=system,
                  user_tokens=user_tokens,
                  history_tokens=tuple(int(n) for _, _, n in hist) if lens else None)


def parse_prompt(prompt: str, meta: dict | None = None) -> Parsed:
    if meta and isinstance(meta.get("messages"), list):
        return from_messages([(str(m.get("role", "user")), str(m.get("content", "")))
                              for m in meta["messages"] if isinstance(m, dict)])
    if "<|im_start|>" in prompt:
        msgs = [(m.group(1), m.group(2)) for m in _CHATML.finditer(prompt)]
        if msgs:
            return from_messages(msgs)
    return Parsed(user=prompt, history=(), system="")


def _frac(s: str, pred: Callable[[str], bool]) -> float:
    return sum(map(pred, s)) / len(s) if s else 0.0


def _nonascii_frac(s: str) -> float:
    return 1.0 - len(s.encode("ascii", "ignore")) / len(s) if s else 0.0


def _log(x: float) -> float:
    return math.log1p(max(0.0, x))


NUMERIC_NAMES = (
    "user_chars", "user_words", "user_lines", "user_nonascii", "user_qmarks", "user_digits",
    "user_code", "user_upper", "user_listy", "n_turns", "hist_chars", "prev_ans_chars",
    "prev_ans_words", "prev_ans_nonascii", "prev_ans_lines", "prev_ans_complete", "mean_ans_chars",
    "max_ans_chars", "prev_user_chars", "ans_per_user", "has_system",
    "user_tokens", "prev_ans_tokens", "mean_recent_ans_tokens", "max_recent_ans_tokens",
    "min_recent_ans_tokens", "prev2_ans_tokens",
)


def numeric(p: Parsed, count_tokens: TokenCounter) -> np.ndarray:
    """Length/shape features of the user turn and of the conversation so far."""
    u = p.user
    sample = u[:4000]
    answers_idx = [i for i, (r, _) in enumerate(p.history) if r == "assistant"]
    answers = [p.history[i][1] for i in answers_idx]
    users = [c for r, c in p.history if r == "user"]
    prev = answers[-1] if answers else ""
    complete = 1.0 if prev.rstrip().endswith((".", "!", "?", ")", "`", '"', "。", ":")) else 0.0
    mean_ans = sum(len(a) for a in answers) / len(answers) if answers else 0.0
    recent = answers_idx[-TOKEN_ANSWERS:]
    if p.history_tokens is not None:
        rtoks = [p.history_tokens[i] for i in recent]
    else:
        rtoks = [count_tokens(p.history[i][1]) for i in recent]
    utoks = p.user_tokens if p.user_tokens is not None else count_tokens(u)
    return np.array([
        _log(len(u)),
        _log(len(_WORD.findall(sample))),
        _log(u.count("\n")),
        _nonascii_frac(sample),
        _log(u.count("?")),
        _frac(sample, str.isdigit),
        _log(u.count("```") + u.count("{") + u.count(";")),
        _frac(sample, str.isupper),
        _log(len(_LIST.findall(sample))),
        float(len(users)),
        _log(sum(len(c) for _, c in p.history)),
        _log(len(prev)),
        _log(len(_WORD.findall(prev[:8000]))),
        _nonascii_frac(prev[:4000]),
        _log(prev.count("\n")),
        complete if answers else -1.0,
        _log(mean_ans),
        _log(max((len(a) for a in answers), default=0)),
        _log(len(users[-1]) if users else 0),
        _log(len(prev)) - _log(len(users[-1]) if users else 0),
        1.0 if p.system.strip() else 0.0,
        _log(utoks),
        _log(rtoks[-1] if rtoks else 0),
        _log(sum(rtoks) / len(rtoks) if rtoks else 0),
        _log(max(rtoks, default=0)),
        _log(min(rtoks, default=0)),
        _log(rtoks[-2] if len(rtoks) > 1 else 0),
    ], dtype=np.float32)


def user_text(p: Parsed) -> str:
    return p.user[:TEXT_CHARS]


def prev_answer_text(p: Parsed) -> str:
    for role, content in reversed(p.history):
        if role == "assistant":
            return content[:PREV_CHARS]
    return ""
