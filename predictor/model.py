"""The learned predictor: two text models stacked under a gradient-boosted bucket classifier.

Stage 1 (shared by every granularity): softmax regressions over hashed word n-grams, one on the user
turn and one on the previous answer, each giving probabilities over fine length classes
(g = 100, last class ≥ 800 tokens).
Stage 2 (one per granularity): ``HistGradientBoostingClassifier`` over the stage-1 probabilities,
numeric features of the prompt and the conversation (lengths, token counts of recent answers,
turn count, script, code, lists...) and, optionally (``TrainConfig.neighbours``; off in the shipped
model), the answer lengths of the nearest training conversations (:mod:`predictor.neighbours`).
Trained on out-of-fold stage-1 (and neighbour) outputs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from predictor.buckets import CAP_TOKENS, default_num_buckets
from predictor.features import (
    NUMERIC_NAMES,
    Parsed,
    TokenCounter,
    numeric,
    parse_prompt,
    prev_answer_text,
    user_text,
)
from predictor.neighbours import NEIGHBOUR_NAMES, NeighbourIndex
from predictor.text import TextModel

FINE_GRANULARITY = 100
FINE_CLASSES = CAP_TOKENS // FINE_GRANULARITY + 1
FORMAT_VERSION = 2


def fine_labels(lengths: np.ndarray) -> np.ndarray:
    return np.minimum(np.asarray(lengths) // FINE_GRANULARITY, FINE_CLASSES - 1)


class StackedModel:
    """Holds stage 1 and the stage-2 heads; ``features``/``predict`` are thread-safe (read-only)."""

    def __init__(self, user_model: TextModel, prev_model: TextModel, heads: dict[int, Any],
                 info: dict[str, Any] | None = None, neighbours: NeighbourIndex | None = None) -> None:
        self.user_model = user_model
        self.prev_model = prev_model
        self.neighbours = neighbours  # over the previous answers of the training rows, when trained
        self.heads = heads  # granularity -> TreeHead
        self.info = info or {}

    @property
    def granularities(self) -> list[int]:
        return sorted(self.heads)

    def feature_names(self) -> list[str]:
        return list(NUMERIC_NAMES) + [f"user_p{i}" for i in range(FINE_CLASSES)] + \
            [f"prev_p{i}" for i in range(FINE_CLASSES)] + (list(NEIGHBOUR_NAMES) if self.neighbours else [])

    def features(self, p: Parsed, count_tokens: TokenCounter) -> np.ndarray:
        prev = prev_answer_text(p)
        parts = [numeric(p, count_tokens), self.user_model.proba_one(user_text(p)), self.prev_model.proba_one(prev)]
        if self.neighbours is not None:
            parts.append(self.neighbours.features_one(prev))
        return np.concatenate(parts)

    def features_batch(self, parsed: Sequence[Parsed], num: np.ndarray) -> np.ndarray:
        prev = TextModel.counts([prev_answer_text(p) for p in parsed])
        parts = [num, self.user_model.proba([user_text(p) for p in parsed]), self.prev_model.proba_counts(prev)]
        if self.neighbours is not None:
            parts.append(self.neighbours.features_counts(prev))
        return np.hstack(parts).astype(np.float32)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump({"version": FORMAT_VERSION, "user": self.user_model, "prev": self.prev_model,
                     "neighbours": self.neighbours, "heads": self.heads, "info": self.info}, path, compress=3)

    @classmethod
    def load(cls, path: Path) -> StackedModel:
        blob = joblib.load(path)
        if not isinstance(blob, dict) or blob.get("version") != FORMAT_VERSION:
            raise RuntimeError(f"{path}: not a predictor artifact of format {FORMAT_VERSION}")
        return cls(blob["user"], blob["prev"], blob["heads"], blob.get("info"), blob.get("neighbours"))


class LearnedPredictor:
    """``LengthPredictor`` over a :class:`StackedModel` head for one granularity."""

    name = "learned"

    def __init__(self, model: StackedModel, granularity: int, count_tokens: TokenCounter | None = None):
        if granularity not in model.heads:
            raise ValueError(f"no trained head for granularity {granularity}; have {model.granularities}")
        self.model = model
        self.granularity = int(granularity)
        self.num_buckets = default_num_buckets(granularity)
        self._head: TreeHead = model.heads[granularity]
        self._count = count_tokens or _default_counter()

    def predict_bucket(self, prompt: str, prompt_tokens: int | None = None, meta: dict | None = None) -> int:
        x = self.model.features(parse_prompt(prompt, meta), self._count)
        return self._head.predict_one(x)

    def predict_proba(self, prompt: str, meta: dict | None = None) -> np.ndarray:
        x = self.model.features(parse_prompt(prompt, meta), self._count)
        return self._head.proba_one(x)

    def predict_buckets(self, prompts: Sequence[str], metas: Sequence[dict | None]) -> list[int]:
        """`predict_bucket` for many prompts at once: one tree walk for the whole batch."""
        pairs = zip(prompts, metas, strict=True)
        x = np.vstack([self.model.features(parse_prompt(p, m), self._count) for p, m in pairs])
        return [self._head.label(row) for row in self._head.raw_batch(x)]


class TreeHead:
    """A fitted ``HistGradientBoostingClassifier`` frozen into plain numpy arrays.

    sklearn's ``predict`` on one row pays input validation and an OpenMP start (1-100 ms on a busy
    2-core machine); here all trees are padded into arrays and walked together, one numpy step per
    tree level (~1 ms). The artifact then needs numpy only, not a matching scikit-learn version.
    """

    def __init__(self, clf: Any) -> None:
        self.classes = np.asarray(clf.classes_)
        self.baseline = np.asarray(clf._baseline_prediction, dtype=np.float64).ravel()
        trees = [(k, p.nodes) for per_iter in clf._predictors for k, p in enumerate(per_iter)]
        width = max(len(nodes) for _, nodes in trees)
        n = len(trees)

        def pad(field: str, dtype: Any) -> np.ndarray:
            out = np.zeros((n, width), dtype=dtype)
            for i, (_, nodes) in enumerate(trees):
                out[i, : len(nodes)] = nodes[field]
            return out

        self.feat = pad("feature_idx", np.int64)
        self.thr = pad("num_threshold", np.float64)
        self.left = pad("left", np.int64)
        self.right = pad("right", np.int64)
        self.leaf = pad("is_leaf", bool)
        self.value = pad("value", np.float64)
        self.miss_left = pad("missing_go_to_left", bool)
        self.kidx = np.array([k for k, _ in trees], dtype=np.int64)
        self.depth = max(int(nodes["depth"].max()) for _, nodes in trees)
        self.rows = np.arange(n)
        self.n_out = len(self.baseline)

    def raw(self, x: np.ndarray) -> np.ndarray:
        return self.raw_batch(np.asarray(x, dtype=np.float64)[None, :])[0]

    def raw_walk(self, x: np.ndarray) -> np.ndarray:
        """The plain walk (every tree, every level): the reference `raw_batch` is checked against."""
        x = np.asarray(x, dtype=np.float64)
        node = np.zeros(len(self.rows), dtype=np.int64)
        for _ in range(self.depth):
            f = self.feat[self.rows, node]
            v = x[f]
            go_left = np.where(np.isnan(v), self.miss_left[self.rows, node], v <= self.thr[self.rows, node])
            nxt = np.where(go_left, self.left[self.rows, node], self.right[self.rows, node])
            node = np.where(self.leaf[self.rows, node], node, nxt)
        vals = self.value[self.rows, node]
        return self.baseline + np.bincount(self.kidx, weights=vals, minlength=self.n_out)

    def raw_batch(self, x: np.ndarray) -> np.ndarray:
        """`raw` for every row of `x` (rows, features) -> (rows, outputs). All rows walk all trees
        together over flat node arrays, only the (tree, row) pairs not yet at a leaf, and stop when
        none is left (most trees are far shallower than the deepest)."""
        if not hasattr(self, "_flat"):
            self._flatten()
        feat, thr, left, right, leaf, miss = self._flat
        x = np.asarray(x, dtype=np.float64)
        n_rows = x.shape[0]
        width = self.feat.shape[1]
        node = np.repeat(self.rows * width, n_rows)  # flat node of each (tree, row) pair
        row = np.tile(np.arange(n_rows), len(self.rows))
        active = np.flatnonzero(~leaf[node])
        while active.size:
            at = node[active]
            v = x[row[active], feat[at]]
            go_left = np.where(np.isnan(v), miss[at], v <= thr[at])
            nxt = np.where(go_left, left[at], right[at])
            node[active] = nxt
            active = active[~leaf[nxt]]
        out = np.zeros((self.n_out, n_rows))
        np.add.at(out, (np.repeat(self.kidx, n_rows), row), self.value.ravel()[node])
        return (out + self.baseline[:, None]).T

    def _flatten(self) -> None:
        width = self.feat.shape[1]
        base = (self.rows * width)[:, None]
        self._flat = (self.feat.ravel(), self.thr.ravel(), (self.left + base).ravel(), (self.right + base).ravel(),
                      self.leaf.ravel(), self.miss_left.ravel())

    def label(self, raw: np.ndarray) -> int:
        """The class a row of raw scores predicts."""
        if raw.shape[0] == 1:  # binary: one logit
            return int(self.classes[int(raw[0] > 0)])
        return int(self.classes[int(np.argmax(raw))])

    def predict_one(self, x: np.ndarray) -> int:
        raw = self.raw(x)
        if raw.shape[0] == 1:  # binary: one logit
            return int(self.classes[int(raw[0] > 0)])
        return int(self.classes[int(np.argmax(raw))])

    def proba_one(self, x: np.ndarray) -> np.ndarray:
        raw = self.raw(x)
        if raw.shape[0] == 1:
            p1 = 1.0 / (1.0 + np.exp(-raw[0]))
            return np.array([1.0 - p1, p1])
        e = np.exp(raw - raw.max())
        return e / e.sum()

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.array([self.predict_one(row) for row in np.asarray(x)], dtype=int)


_COUNTER_LOCK = threading.Lock()


def _default_counter() -> TokenCounter:
    """Token counts in the default tokenizer (the one the labels and token features use)."""
    from predictor.tokenizer import load_default_tokenizer

    with _COUNTER_LOCK:
        tok = load_default_tokenizer()
    backend = getattr(tok, "_tokenizer", None) or getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode"):
        return lambda text: len(backend.encode(text, add_special_tokens=False).ids) if text else 0
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
