"""Bucket arithmetic: bucket k covers [k*g, (k+1)*g) tokens; a capped last bucket is open-ended."""

from __future__ import annotations

# The learned predictor's last bucket is "≥ (K-1)·g". K is chosen per granularity so that the last
# bucket starts at 800 tokens (g=100: 9 buckets, g=200: 5, g=400: 3): 96% of ShareGPT answers end
# below 800 tokens and 99.7% below 1000, so finer buckets there would hold almost no examples.
CAP_TOKENS = 800
HEAVY_DECODE_TOKENS = 128  # TetriInfer: a decode is heavy when it produces more than 128 tokens


def default_num_buckets(granularity: int) -> int:
    _check(granularity)
    return -(-CAP_TOKENS // granularity) + 1


def bucket_of(length: int, granularity: int, num_buckets: int | None = None) -> int:
    """The bucket holding ``length`` tokens; with ``num_buckets`` the last bucket takes the rest."""
    _check(granularity)
    b = max(0, int(length)) // granularity
    if num_buckets is not None:
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        b = min(b, num_buckets - 1)
    return b


def bucket_range(bucket: int, granularity: int) -> tuple[int, int]:
    """``[lo, hi)`` token range of an (uncapped) bucket."""
    _check(granularity)
    if bucket < 0:
        raise ValueError(f"bucket must be >= 0, got {bucket}")
    return bucket * granularity, (bucket + 1) * granularity


def is_heavy_bucket(bucket: int, granularity: int, threshold: int = HEAVY_DECODE_TOKENS) -> bool:
    """Heavy when even the lower end of the bucket exceeds the threshold (the dispatcher's rule)."""
    return bucket * granularity > threshold


def _check(granularity: int) -> None:
    if int(granularity) < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
