"""The simulator's length predictions: each request's output-length bucket as the live predictor
of the configured name (``PolicyConfig.predictor``) answers.

* ``oracle``: the bucket of the true output length.
* ``constant``: bucket 0 (every decode light, KV need = the prompt).
* ``learned``: the shipped model (predictor/artifacts, ``make_predictor("learned")``) run on the
  requests' prompt texts, where every request carries one (a ``prompt`` string, e.g. a ShareGPT
  workload's); otherwise its stand-in: the true bucket with ``learned_accuracy``, a miss landing on
  a neighbouring bucket (the classifier's usual error), drawn from ``rng``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from backends.prefix import BLOCK_TOKENS
from orchestrator.policies.config import PolicyConfig
from orchestrator.policies.predictors import bucket_of, make_predictor
from orchestrator.policies.types import RequestView
from orchestrator.sim.state import SimRequest


def predicted_buckets(
    policy: PolicyConfig,
    outputs: Sequence[int],
    texts: Sequence[str | None],
    rng: random.Random,
    learned_accuracy: float,
) -> tuple[list[int], str]:
    """(the bucket of each request, how they were predicted: the predictor's name, or
    "learned-standin" where the learned model had no texts to read)."""
    g = policy.predictor_granularity
    if policy.predictor == "constant":
        return [0] * len(outputs), "constant"
    if policy.predictor == "learned" and texts and all(t is not None for t in texts):
        model = make_predictor("learned", g)
        batch = getattr(model, "predict_buckets", None)
        if batch is not None:
            return [int(b) for b in batch(list(texts), [None] * len(texts))], "learned"
        return [int(model.predict_bucket(t or "")) for t in texts], "learned"
    out = []
    for n in outputs:
        true_b = bucket_of(n, g)  # what the oracle predictor answers
        bucket = true_b
        if policy.predictor == "learned" and rng.random() >= learned_accuracy:
            bucket = true_b + 1 if true_b == 0 or rng.random() < 0.5 else true_b - 1
        out.append(bucket)
    return out, "oracle" if policy.predictor == "oracle" else "learned-standin"


def set_views(
    reqs: Sequence[SimRequest], policy: PolicyConfig, texts: Sequence[str | None], rng: random.Random,
    learned_accuracy: float,
) -> str:
    """Give each request its view (predicted bucket, KV need; its prompt's block ids as prefix keys)
    and return how the buckets were predicted."""
    g = policy.predictor_granularity
    outputs = [r.output_tokens for r in reqs]
    buckets, predicted_by = predicted_buckets(policy, outputs, texts, rng, learned_accuracy)
    for r, bucket in zip(reqs, buckets, strict=True):
        r.view = RequestView(
            id=r.id, arrival=r.arrival, prompt_tokens=r.prompt_tokens, max_tokens=r.output_tokens,
            predicted_bucket=bucket, granularity=g, heavy_decode_threshold=policy.heavy_decode_threshold,
            prefix_hashes=r.blocks[: r.prompt_tokens // BLOCK_TOKENS],
        )  # fmt: skip
        r.predicted_lo = r.view.predicted_output_lo
        r.heavy_decode = r.view.heavy_decode
        r.kv_need = r.view.kv_need
    return predicted_by
