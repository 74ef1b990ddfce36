"""Nearest-neighbour answer-length features (predictor.neighbours) on hand-made texts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from predictor.neighbours import CLOSE_SIM, NEIGHBOUR_NAMES, NeighbourIndex
from predictor.text import TextModel, hashed_terms

F = {name: i for i, name in enumerate(NEIGHBOUR_NAMES)}

TEXTS = [
    "quantum entanglement violates bell inequalities in photon experiments",
    "quantum entanglement violates bell inequalities in photon experiments",  # exact copy
    "banana bread recipe with walnuts cinnamon and brown sugar",
    "kubernetes ingress controller nginx annotations tls certificates",
    "medieval castle siege trebuchet catapult moat drawbridge",
    "photosynthesis chlorophyll thylakoid stroma calvin cycle",
]
LENGTHS = [900, 1000, 50, 300, 420, 120]


def _index(k: int = 3) -> NeighbourIndex:
    # max_df=1.0: with six documents every term is "rare" enough to be indexed
    return NeighbourIndex(k=k, terms=48, max_df=1.0).fit(TextModel.counts(TEXTS), np.array(LENGTHS))


def test_hashed_terms_match_the_vectorizer_row() -> None:
    text = "Write a poem, a poem about cats!"
    idx, cnt = hashed_terms(text)
    row = TextModel.counts([text])
    row.sort_indices()
    assert idx.tolist() == row.indices.tolist()
    assert cnt.tolist() == row.data.astype(int).tolist()
    assert cnt.max() == 2  # "a poem" twice: "a", "poem" and the bigram each count 2
    assert hashed_terms("")[0].size == 0


def test_exact_copy_is_the_top_neighbour() -> None:
    idx = _index()
    f = idx.features([TEXTS[2]])[0]
    assert f[F["nn_top_sim"]] == pytest.approx(1.0, abs=1e-3)  # float16 storage
    assert f[F["nn_top_len"]] == pytest.approx(math.log1p(50))
    assert f[F["nn_close_count"]] == 1.0
    assert f[F["nn_close_mean_len"]] == pytest.approx(math.log1p(50))
    assert f[F["nn10_long_share"]] < 0.01


def test_two_copies_average_and_long_share() -> None:
    idx = _index()
    f = idx.features(["quantum entanglement violates bell inequalities in photon experiments"])[0]
    assert f[F["nn_close_count"]] == 2.0
    assert f[F["nn_close_mean_len"]] == pytest.approx((math.log1p(900) + math.log1p(1000)) / 2, rel=1e-5)
    assert f[F["nn10_long_share"]] == pytest.approx(1.0, abs=1e-3)  # both copies answered >= 800 tokens
    assert f[F["nn5_std_len"]] > 0.0


def test_excluded_rows_are_not_neighbours() -> None:
    idx = _index()
    exclude = np.array([True, True, False, False, False, False])  # as if rows 0-1 were in the same fold
    f = idx.features_counts(TextModel.counts([TEXTS[0]]), [exclude])[0]
    assert np.isnan(f).all()  # nothing else shares a term with it
    f = idx.features_counts(TextModel.counts([TEXTS[0]]), [np.array([True] + [False] * 5)])[0]
    assert f[F["nn_top_sim"]] == pytest.approx(1.0, abs=1e-3) and f[F["nn_top_len"]] == pytest.approx(
        math.log1p(1000))


def test_no_shared_terms_or_empty_text_gives_nan() -> None:
    idx = _index()
    assert np.isnan(idx.features_one("")).all()
    assert np.isnan(idx.features_one("zebra xylophone")).all()


def test_partial_overlap_ranks_by_cosine_and_single_path_matches_batch() -> None:
    idx = _index()
    q = "nginx ingress tls certificates for a castle drawbridge"
    one = idx.features_one(q)
    batch = idx.features([q])[0]
    assert np.array_equal(one, batch, equal_nan=True)
    assert 0.0 < one[F["nn_top_sim"]] < CLOSE_SIM
    assert one[F["nn_top_len"]] == pytest.approx(math.log1p(300))  # four shared terms beat two
    assert one[F["nn_close_count"]] == 0.0 and np.isnan(one[F["nn_close_mean_len"]])


def test_common_terms_are_not_indexed() -> None:
    texts = [f"the answer is {w}" for w in ("alpha", "beta", "gamma", "delta")]
    idx = NeighbourIndex(k=2, max_df=0.5).fit(TextModel.counts(texts), np.array([10, 20, 30, 40]))
    assert np.isnan(idx.features_one("the answer is")).all()  # every term is in all four rows
    assert idx.features_one("the answer is gamma")[F["nn_top_len"]] == pytest.approx(math.log1p(30))


def test_stack_with_neighbours_trains_and_serves_like_the_batch_path(tmp_path) -> None:
    from predictor.data import examples_of, load_conversations, split_of
    from predictor.evaluate import batch_predict, templated
    from predictor.model import LearnedPredictor, StackedModel, _default_counter
    from predictor.tokenizer import load_default_tokenizer
    from predictor.train import TrainConfig, train

    ex: dict[str, list] = {"train": [], "val": [], "test": []}
    for c in load_conversations(progress=False, limit=400):
        ex[split_of(c.id)].extend(examples_of(c))
    cfg = TrainConfig(folds=2, text_epochs=4, max_iter=30, progress=False, threads=1, neighbours=True)
    model = train(ex["train"], ex["val"], _default_counter(), (200,), cfg)
    assert model.neighbours is not None
    assert model.info["feature_names"][-len(NEIGHBOUR_NAMES):] == list(NEIGHBOUR_NAMES)
    path = tmp_path / "nn.joblib"
    model.save(path)
    loaded = StackedModel.load(path)
    assert loaded.neighbours is not None and len(loaded.neighbours.log_len) == len(ex["train"])
    sample = ex["val"][:30]
    want = batch_predict(loaded, sample, 200, _default_counter()).tolist()
    pred = LearnedPredictor(loaded, 200)
    assert [pred.predict_bucket(p) for p in templated(sample, load_default_tokenizer())] == want
