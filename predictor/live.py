"""Running accuracy of served predictions (admin stats and metrics)."""

from __future__ import annotations

import threading

from predictor.buckets import HEAVY_DECODE_TOKENS, bucket_of, is_heavy_bucket


class LiveAccuracy:
    """Thread-safe counters over (predicted bucket, true output length) pairs.

    ``num_buckets`` caps the true bucket like the learned predictor's open-ended last bucket; leave
    it ``None`` for uncapped predictors (oracle). ``heavy_recall`` is the share of heavy decodes
    (more than 128 tokens) whose predicted bucket was heavy too (0.0 before any; see ``heavy_n``).
    """

    def __init__(self, granularity: int = 200, num_buckets: int | None = None) -> None:
        bucket_of(0, granularity, num_buckets)  # validates both
        self.granularity = int(granularity)
        self.num_buckets = num_buckets
        self._lock = threading.Lock()
        self._n = self._hits = self._near = self._heavy = self._heavy_hits = 0

    def record(self, predicted_bucket: int | None, true_len: int | None) -> None:
        if predicted_bucket is None or true_len is None:
            return
        pred = int(predicted_bucket)
        if self.num_buckets is not None:
            pred = min(pred, self.num_buckets - 1)
        true = bucket_of(int(true_len), self.granularity, self.num_buckets)
        heavy = int(true_len) > HEAVY_DECODE_TOKENS
        with self._lock:
            self._n += 1
            self._hits += pred == true
            self._near += abs(pred - true) <= 1
            if heavy:
                self._heavy += 1
                self._heavy_hits += is_heavy_bucket(pred, self.granularity)

    def snapshot(self) -> dict[str, float | int]:
        with self._lock:
            n, hits, near, heavy, heavy_hits = self._n, self._hits, self._near, self._heavy, self._heavy_hits
        return {
            "n": n,
            "accuracy": hits / n if n else 0.0,
            "within_one_bucket": near / n if n else 0.0,
            "heavy_recall": heavy_hits / heavy if heavy else 0.0,
            "heavy_n": heavy,
        }

    def reset(self) -> None:
        with self._lock:
            self._n = self._hits = self._near = self._heavy = self._heavy_hits = 0
