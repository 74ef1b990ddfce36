"""Held-out evaluation: accuracy against the majority baseline, heavy-decode recall, latency, confusion."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from predictor.buckets import HEAVY_DECODE_TOKENS, bucket_of, default_num_buckets, is_heavy_bucket
from predictor.data import Example
from predictor.model import LearnedPredictor, StackedModel
from predictor.train import prepare


def bucket_metrics(pred: np.ndarray, lengths: np.ndarray, granularity: int, num_buckets: int,
                   majority: int) -> dict[str, Any]:
    """Accuracy, within-one-bucket and heavy-decode recall of ``pred`` against true lengths."""
    pred = np.asarray(pred, dtype=int)
    lengths = np.asarray(lengths, dtype=int)
    true = np.array([bucket_of(n, granularity, num_buckets) for n in lengths], dtype=int)
    heavy = lengths > HEAVY_DECODE_TOKENS
    pred_heavy = np.array([is_heavy_bucket(b, granularity) for b in pred], dtype=bool)
    n = len(true)
    return {
        "granularity": granularity,
        "num_buckets": num_buckets,
        "n": n,
        "accuracy": float(np.mean(pred == true)) if n else 0.0,
        "majority_bucket": int(majority),
        "majority_accuracy": float(np.mean(true == majority)) if n else 0.0,
        "within_one_bucket": float(np.mean(np.abs(pred - true) <= 1)) if n else 0.0,
        "heavy_share": float(np.mean(heavy)) if n else 0.0,
        "heavy_recall": float(np.mean(pred_heavy[heavy])) if heavy.any() else 0.0,
        "heavy_precision": float(np.mean(heavy[pred_heavy])) if pred_heavy.any() else 0.0,
        "majority_heavy_recall": float(is_heavy_bucket(majority, granularity)),
    }


def confusion(pred: np.ndarray, true: np.ndarray, num_buckets: int) -> np.ndarray:
    m = np.zeros((num_buckets, num_buckets), dtype=int)
    np.add.at(m, (np.asarray(true, dtype=int), np.asarray(pred, dtype=int)), 1)
    return m


def plot_confusion(matrix: np.ndarray, granularity: int, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = matrix.shape[0]
    labels = [f"{i * granularity}-" + (f"{(i + 1) * granularity}" if i < k - 1 else "") for i in range(k)]
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * k, 0.8 + 0.7 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted bucket (tokens)")
    ax.set_ylabel("true bucket (tokens)")
    ax.set_title(title or f"output-length predictor, g={granularity} (row-normalised colour)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def batch_predict(model: StackedModel, examples: Sequence[Example], granularity: int,
                  count_tokens: Any) -> np.ndarray:
    prep = prepare(examples, count_tokens)
    return np.asarray(model.heads[granularity].predict(model.features_batch(prep.parsed, prep.num)), dtype=int)


def single_prompt_latency(predictor: LearnedPredictor, prompts: Sequence[str], warmup: int = 20) -> dict[str, float]:
    """Wall time of ``predict_bucket`` on one templated prompt at a time (ms)."""
    for p in prompts[:warmup]:
        predictor.predict_bucket(p)
    times = []
    for p in prompts:
        t = time.perf_counter()
        predictor.predict_bucket(p)
        times.append((time.perf_counter() - t) * 1000.0)
    arr = np.array(times)
    return {"p50_latency_ms": float(np.percentile(arr, 50)), "p99_latency_ms": float(np.percentile(arr, 99)),
            "mean_latency_ms": float(arr.mean()), "latency_n": len(arr)}


def templated(examples: Sequence[Example], tokenizer: Any) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in e.messages],
                                          tokenize=False, add_generation_prompt=True) for e in examples]


def majority_bucket(lengths: Sequence[int], granularity: int, num_buckets: int | None = None) -> int:
    k = num_buckets or default_num_buckets(granularity)
    return int(np.bincount([bucket_of(n, granularity, k) for n in lengths], minlength=k).argmax())
