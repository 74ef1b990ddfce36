"""Training: features, out-of-fold stage-1 probabilities, one stage-2 head per granularity."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from threadpoolctl import threadpool_limits

from predictor.buckets import bucket_of, default_num_buckets
from predictor.data import Example, base_id
from predictor.features import Parsed, TokenCounter, from_messages, numeric, prev_answer_text, user_text
from predictor.model import FINE_CLASSES, StackedModel, TreeHead, fine_labels
from predictor.neighbours import NEIGHBOUR_NAMES, NeighbourIndex
from predictor.text import TextModel

GRANULARITIES = (100, 200, 400)


@dataclass
class TrainConfig:
    folds: int = 5
    text_epochs: int = 15
    text_alpha: float = 5e-6
    max_iter: int = 250
    learning_rate: float = 0.1
    max_leaf_nodes: int = 31
    l2: float = 1.0
    neighbours: bool = False  # add nearest-neighbour answer lengths (predictor.neighbours) to the stack
    nn_k: int = 20  # neighbours summarised per row
    nn_terms: int = 48  # largest TF-IDF weights kept per indexed previous answer
    nn_max_df: float = 0.01  # only terms in at most this share of training rows are indexed
    seed: int = 0
    progress: bool = True
    threads: int | None = None  # OpenMP threads for boosting (1 is faster on a busy 2-core box)


@dataclass
class Prepared:
    parsed: list[Parsed]
    num: np.ndarray
    lengths: np.ndarray
    groups: np.ndarray


def _fold_of(example_id: str, folds: int) -> int:
    key = base_id(example_id.split("#")[0]).encode()
    return int.from_bytes(hashlib.sha1(b"fold:" + key).digest()[:4], "big") % folds


def prepare(examples: Sequence[Example], count_tokens: TokenCounter, folds: int = 5) -> Prepared:
    parsed = [from_messages(e.messages, e.token_lens) for e in examples]
    num = np.stack([numeric(p, count_tokens) for p in parsed]) if parsed else np.zeros((0, 0), np.float32)
    return Prepared(parsed, num.astype(np.float32), np.array([e.answer_len for e in examples]),
                    np.array([_fold_of(e.id, folds) for e in examples]))


def _text_fit(texts: list[str], y: np.ndarray, cfg: TrainConfig) -> TextModel:
    return TextModel(FINE_CLASSES, alpha=cfg.text_alpha, epochs=cfg.text_epochs, seed=cfg.seed).fit(
        TextModel.counts(texts), y)


def out_of_fold(tr: Prepared, cfg: TrainConfig, log: Any = None
                ) -> tuple[np.ndarray, TextModel, TextModel, NeighbourIndex | None]:
    """Stage-1 probabilities (and neighbour features) for each training row, from models and training
    rows that never saw its conversation (the neighbour index masks the row's own fold)."""
    y = fine_labels(tr.lengths)
    fields = [[user_text(p) for p in tr.parsed], [prev_answer_text(p) for p in tr.parsed]]
    n_nn = len(NEIGHBOUR_NAMES) if cfg.neighbours else 0
    oof = np.zeros((len(y), 2 * FINE_CLASSES + n_nn), dtype=np.float32)
    finals: list[TextModel] = []
    advance = log or (lambda k=1: None)
    all_counts = [TextModel.counts(texts) for texts in fields]
    for j, counts in enumerate(all_counts):
        for f in range(cfg.folds):
            held = tr.groups == f
            m = TextModel(FINE_CLASSES, alpha=cfg.text_alpha, epochs=cfg.text_epochs, seed=cfg.seed).fit(
                counts[~held], y[~held])
            oof[held, j * FINE_CLASSES:(j + 1) * FINE_CLASSES] = m.proba_counts(counts[held])
            advance(1)
        finals.append(TextModel(FINE_CLASSES, alpha=cfg.text_alpha, epochs=cfg.text_epochs,
                                seed=cfg.seed).fit(counts, y))
        advance(1)
    index = None
    if cfg.neighbours:
        index = NeighbourIndex(k=cfg.nn_k, terms=cfg.nn_terms, max_df=cfg.nn_max_df).fit(all_counts[1], tr.lengths)
        folds = [tr.groups == f for f in range(cfg.folds)]
        oof[:, 2 * FINE_CLASSES:] = index.features_counts(all_counts[1], [folds[f] for f in tr.groups])
    advance(1)
    return oof, finals[0], finals[1], index


def fit_head(x: np.ndarray, y: np.ndarray, x_val: np.ndarray | None, y_val: np.ndarray | None,
             cfg: TrainConfig) -> HistGradientBoostingClassifier:
    early = x_val is not None and len(x_val) > 0
    clf = HistGradientBoostingClassifier(
        max_iter=cfg.max_iter, learning_rate=cfg.learning_rate, max_leaf_nodes=cfg.max_leaf_nodes,
        l2_regularization=cfg.l2, early_stopping=early, n_iter_no_change=15, random_state=cfg.seed,
        scoring="loss")
    with threadpool_limits(limits=cfg.threads, user_api="openmp"):
        if early:
            clf.fit(x, y, X_val=x_val, y_val=y_val)
        else:
            clf.fit(x, y)
    return clf


def train(train_ex: Sequence[Example], val_ex: Sequence[Example], count_tokens: TokenCounter,
          granularities: Sequence[int] = GRANULARITIES, cfg: TrainConfig | None = None) -> StackedModel:
    cfg = cfg or TrainConfig()
    t0 = time.time()
    steps = 2 * (cfg.folds + 1) + len(granularities) + 2
    if cfg.progress:
        from predictor.progress import bar

        ctx = bar("training predictor", total=steps)
    else:
        from contextlib import nullcontext

        ctx = nullcontext(lambda k=1: None)
    with ctx as advance:
        tr = prepare(train_ex, count_tokens, cfg.folds)
        va = prepare(val_ex, count_tokens, cfg.folds)
        advance(1)
        oof, user_m, prev_m, index = out_of_fold(tr, cfg, advance)
        stack = StackedModel(user_m, prev_m, {}, neighbours=index)
        x_tr = np.hstack([tr.num, oof])
        x_va = stack.features_batch(va.parsed, va.num) if va.parsed else None
        iters: dict[int, int] = {}
        for g in granularities:
            k = default_num_buckets(g)
            y_tr = np.array([bucket_of(n, g, k) for n in tr.lengths])
            y_va = np.array([bucket_of(n, g, k) for n in va.lengths]) if x_va is not None else None
            clf = fit_head(x_tr, y_tr, x_va, y_va, cfg)
            stack.heads[g] = TreeHead(clf)
            iters[g] = int(clf.n_iter_)
            advance(1)
    stack.info = {"n_train": len(train_ex), "n_val": len(val_ex), "train_s": round(time.time() - t0, 1),
                  "config": cfg.__dict__.copy(), "boosting_iters": iters, "feature_names": stack.feature_names()}
    return stack
