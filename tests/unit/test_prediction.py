"""Predictions on the request path: batched off the loop, cached, and skipped where no decision
turns on them."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from backends.base import SamplingParams
from orchestrator.config import Settings
from orchestrator.placement import Placement
from orchestrator.prediction import PredictionBatcher
from orchestrator.serving import Job, Server
from tests.conftest import TINY, fake_cluster


class CountingPredictor:
    """Bucket = prompt length in characters; records every batch it was called with."""

    name = "counting"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s

    def predict_bucket(self, prompt: str, prompt_tokens: int | None = None, meta: dict | None = None) -> int:
        return self.predict_buckets([prompt], [meta])[0]

    def predict_buckets(self, prompts: list[str], metas: list[dict | None]) -> list[int]:
        import time

        time.sleep(self.delay_s)
        self.batches.append(len(prompts))
        self.threads.add(threading.current_thread().name)
        return [len(p) for p in prompts]


async def test_requests_arriving_together_share_one_batch_off_the_loop():
    predictor = CountingPredictor(delay_s=0.05)
    batcher = PredictionBatcher(predictor)
    first = asyncio.ensure_future(batcher.predict("x", 1, {}))
    await asyncio.sleep(0.01)  # its batch of one is running in a thread now
    rest = await asyncio.gather(*(batcher.predict("x" * i, i, {}) for i in range(2, 21)))
    assert [await first, *rest] == list(range(1, 21))
    # The other 19 arrived while the first batch ran: they went together, in one thread hop.
    assert predictor.batches == [1, 19]
    assert threading.main_thread().name not in predictor.threads


async def test_a_repeated_prompt_is_answered_from_the_cache():
    predictor = CountingPredictor()
    batcher = PredictionBatcher(predictor)
    assert await batcher.predict("same prompt", 2, {}) == 11
    assert await batcher.predict("same prompt", 2, {}) == 11
    assert predictor.batches == [1]
    # The oracle's answer depends on the output length in meta: no sharing across it.
    assert await batcher.predict("same prompt", 2, {"output_len": 5}) == 11
    assert predictor.batches == [1, 1]


async def test_a_failing_predictor_gives_none_and_never_raises():
    class Broken:
        def predict_bucket(self, prompt, prompt_tokens=None, meta=None):
            raise RuntimeError("boom")

    assert await PredictionBatcher(Broken()).predict("p", 1, {}) is None
    assert await PredictionBatcher(None).predict("p", 1, {}) is None


def test_the_batched_tree_walk_matches_the_plain_walk():
    from orchestrator.policies.predictors import make_predictor

    learned = make_predictor("learned", 200)
    head = learned._head
    rng = np.random.default_rng(0)
    n_features = int(head.feat.max()) + 1
    x = rng.normal(size=(32, n_features)) * 50
    x[rng.random(x.shape) < 0.05] = np.nan  # missing values take the trees' default branch
    reference = np.vstack([head.raw_walk(row) for row in x])
    assert np.allclose(head.raw_batch(x), reference)
    prompts = ["Write a very long story about dragons.", "What is 2+2?", "Summarise this: " + "text " * 300]
    batched = learned.predict_buckets(prompts, [None] * len(prompts))
    assert batched == [learned.predict_bucket(p) for p in prompts]


class _Role:
    def __init__(self, role: str) -> None:
        self.role = role


def _server(tmp_path: Path, members: list[tuple[str, str]], kv_tokens: int, **overrides) -> Server:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 't.db'}", model=TINY, **overrides)
    cluster = fake_cluster([(iid, role, _Role(role)) for iid, role in members], kv_tokens=kv_tokens)
    return Server(settings, cluster, Placement(settings, cluster), None, CountingPredictor())


def _job(prompt_tokens: int, max_tokens: int = 64) -> Job:
    return Job(TINY, list(range(prompt_tokens)), SamplingParams(max_tokens=max_tokens), "p")


@pytest.mark.parametrize(("members", "kv", "prompt", "expected"), [
    ([("p", "prefill"), ("d", "decode")], 100_000, 64, False),        # one decode instance with room
    ([("p", "prefill"), ("d", "decode")], 100, 64, True),             # ... whose KV is tight: admission
    ([("p", "prefill"), ("d0", "decode"), ("d1", "decode")], 100_000, 64, True),  # the dispatcher chooses
    ([("p", "prefill"), ("d", "decode")], 100_000, 600, True),        # a heavy prompt: the HPHD rule
    ([("c", "colocated")], 100_000, 64, False),                       # co-located only: least loaded
])
def test_prediction_runs_only_where_a_decision_turns_on_it(tmp_path, members, kv, prompt, expected):
    server = _server(tmp_path, members, kv)
    assert server._prediction_matters(_job(prompt)) is expected


async def test_skipped_predictions_are_still_sampled_for_live_accuracy(tmp_path):
    server = _server(tmp_path, [("p", "prefill"), ("d", "decode")], 100_000, predictor_sample_every=4,
                     predictor_sample_max_per_s=0)
    futures = [server._start_prediction(_job(64)) for _ in range(8)]
    results = await asyncio.gather(*futures)
    assert [r is not None for r in results] == [False, False, False, True] * 2


async def test_accuracy_samples_are_capped_per_second(tmp_path, monkeypatch):
    from orchestrator import serving

    clock = [100.0]
    monkeypatch.setattr(serving.time, "monotonic", lambda: clock[0])
    server = _server(tmp_path, [("p", "prefill"), ("d", "decode")], 100_000, predictor_sample_every=2,
                     predictor_sample_max_per_s=4.0)
    sampled = []
    for _ in range(40):  # 40 requests in the same instant: every 2nd is due, one is taken
        sampled.append(await server._start_prediction(_job(64)) is not None)
    assert sum(sampled) == 1
    clock[0] += 0.25  # a quarter of a second later: room for one more
    later = [await server._start_prediction(_job(64)) is not None for _ in range(4)]
    assert sum(later) == 1


async def test_the_decode_choice_waits_for_a_prediction_only_where_it_turns_on_it(tmp_path, monkeypatch):
    """A prediction sampled only for the accuracy figures holds its request up not at all; one the
    dispatcher needs (two decode instances) is waited for; one already there is taken at once,
    without `asyncio.wait_for` (its task would cost a pass of a busy event loop)."""
    import time

    from orchestrator import serving

    for members, waits in (([("p", "prefill"), ("d", "decode")], False),
                           ([("p", "prefill"), ("d0", "decode"), ("d1", "decode")], True)):
        server = _server(tmp_path, members, 100_000)
        server.predictor = CountingPredictor(delay_s=0.03)
        job = _job(64)
        prediction = asyncio.ensure_future(server._predict(job))
        started = time.perf_counter()
        bucket = await server._decode_prediction(job, prediction)
        assert (bucket is not None) is waits and (time.perf_counter() - started >= 0.02) is waits
        await prediction
    monkeypatch.setattr(serving.asyncio, "wait_for", None)  # a done prediction must not reach it
    done = asyncio.get_running_loop().create_future()
    done.set_result(7)
    assert await server._decode_prediction(job, done) == 7
