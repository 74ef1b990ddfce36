"""Predictors that need no model: the oracle (true length, for benchmarks) and a constant bucket."""

from __future__ import annotations

from predictor.buckets import bucket_of


class MissingOutputLength(KeyError, ValueError):
    """The oracle was asked about a request whose ``meta`` carries no ``output_len``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing output_len"


class OraclePredictor:
    name = "oracle"

    def __init__(self, granularity: int = 200, num_buckets: int | None = None) -> None:
        bucket_of(0, granularity, num_buckets)
        self.granularity = int(granularity)
        self.num_buckets = num_buckets

    def predict_bucket(self, prompt: str, prompt_tokens: int | None = None, meta: dict | None = None) -> int:
        if not meta or meta.get("output_len") is None:
            raise MissingOutputLength(
                "the oracle predictor needs the true output length in meta['output_len'] "
                "(benchmark requests carry it; use the 'learned' or 'constant' predictor otherwise)")
        n = int(meta["output_len"])
        if n < 0:
            raise ValueError(f"meta['output_len'] must be >= 0, got {n}")
        return bucket_of(n, self.granularity, self.num_buckets)


class ConstantPredictor:
    name = "constant"

    def __init__(self, granularity: int = 200, bucket: int = 0) -> None:
        bucket_of(0, granularity)
        if bucket < 0:
            raise ValueError(f"bucket must be >= 0, got {bucket}")
        self.granularity = int(granularity)
        self.bucket = int(bucket)

    def predict_bucket(self, prompt: str, prompt_tokens: int | None = None, meta: dict | None = None) -> int:
        return self.bucket
