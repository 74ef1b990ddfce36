"""Output-length predictor (TetriInfer §3.3.2): classifies a prompt into an output-length bucket.

Bucket k covers ``[k*g, (k+1)*g)`` tokens for granularity g (100, 200 or 400); the learned model's
last bucket is open-ended (``≥ 800`` tokens, see :mod:`predictor.buckets`).
"""

from predictor.baselines import ConstantPredictor, MissingOutputLength, OraclePredictor
from predictor.buckets import (
    HEAVY_DECODE_TOKENS,
    bucket_of,
    bucket_range,
    default_num_buckets,
    is_heavy_bucket,
)
from predictor.live import LiveAccuracy
from predictor.registry import LengthPredictor, load_predictor

__all__ = [
    "HEAVY_DECODE_TOKENS",
    "ConstantPredictor",
    "LengthPredictor",
    "LiveAccuracy",
    "MissingOutputLength",
    "OraclePredictor",
    "bucket_of",
    "bucket_range",
    "default_num_buckets",
    "is_heavy_bucket",
    "load_predictor",
]
