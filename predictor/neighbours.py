"""Nearest-neighbour answer lengths: what did the training conversations with the most similar text get?

ShareGPT repeats conversations (shared twice, templated prompts, near-copies), so the answer lengths
of the training rows whose text is most similar are a strong hint. The text (by default the previous
answer, which identifies a conversation better than a short follow-up such as "continue") becomes a
hashed TF-IDF vector over *rare* word 1-2-grams only (document frequency ≤ ``max_df``; common words
add little to a near-duplicate match and would make every posting list long), keeping its ``terms``
largest weights. The training vectors are stored as an inverted index (term -> rows, weights), so a
query costs one pass over the posting lists of its few terms: a sparse product by hand, ~1 ms.

The features (:data:`NEIGHBOUR_NAMES`) summarise the top-``k`` cosine neighbours: best similarity and
its answer length, similarity-weighted mean/spread of log answer length over the top 5 and top 20,
how many neighbours are near-copies (similarity ≥ 0.5) and their mean log length, and the weighted
share of long (≥ 800-token) answers. An empty text gives NaN everywhere (the trees route NaN).
For training the stack they are computed out of fold: a row's neighbours come from other folds only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from predictor.text import N_FEATURES, TextModel, hashed_terms

NEIGHBOUR_NAMES = (
    "nn_top_sim", "nn_top_len", "nn5_mean_len", "nn5_std_len", "nn20_mean_len", "nn20_std_len",
    "nn5_mean_sim", "nn_close_count", "nn_close_mean_len", "nn10_long_share",
)
CLOSE_SIM = 0.5
LONG_TOKENS = 800


class NeighbourIndex:
    """Inverted index of training texts with their answer lengths; ``features_one`` is read-only."""

    def __init__(self, k: int = 20, terms: int = 48, max_df: float = 0.01) -> None:
        self.k = k
        self.terms = terms
        self.max_df = max_df
        self.weight: np.ndarray | None = None  # (N_FEATURES,) idf of kept terms, 0 for dropped ones
        self.indptr: np.ndarray | None = None  # CSC over terms: rows[indptr[t]:indptr[t+1]] contain term t
        self.rows: np.ndarray | None = None
        self.vals: np.ndarray | None = None  # float16 weights of the normalised row vectors
        self.log_len: np.ndarray | None = None  # log1p(answer length) per training row
        self.long: np.ndarray | None = None  # answer length >= LONG_TOKENS per training row

    # -- building ------------------------------------------------------------------------------
    def unit_vector(self, idx: np.ndarray, cnt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hashed term ids and counts -> the kept terms and weights of a unit TF-IDF vector."""
        assert self.weight is not None
        w = (np.log1p(cnt.astype(np.float64)) + 1.0) * self.weight[idx]
        keep = w > 0
        if keep.sum() > self.terms:
            keep &= w >= np.partition(w, len(w) - self.terms)[len(w) - self.terms]
        idx, w = idx[keep], w[keep]
        norm = float(np.sqrt(np.dot(w, w)))
        return idx, (w / norm if norm > 0 else w)

    def fit(self, counts: sp.csr_matrix, lengths: np.ndarray) -> NeighbourIndex:
        """Index the rows of hashed counts (``TextModel.counts``) with their answer lengths."""
        counts = counts.tocsr()
        n = counts.shape[0]
        df = np.bincount(counts.indices, minlength=N_FEATURES)
        idf = np.log((1 + n) / (1 + df)) + 1.0
        self.weight = np.where(df <= self.max_df * n, idf, 0.0).astype(np.float32)
        rows, terms, vals = [], [], []
        for i, (idx, cnt) in enumerate(_rows(counts)):
            t, w = self.unit_vector(idx, cnt)
            rows.append(np.full(len(t), i, dtype=np.int32))
            terms.append(t)
            vals.append(w)
        csc = sp.csc_matrix((np.concatenate(vals).astype(np.float32),
                             (np.concatenate(rows), np.concatenate(terms))), shape=(n, N_FEATURES))
        csc.sort_indices()
        self.indptr = csc.indptr.astype(np.int32)
        self.rows = csc.indices.astype(np.int32)
        self.vals = csc.data.astype(np.float16)
        self.log_len = np.log1p(np.asarray(lengths, dtype=np.float64)).astype(np.float32)
        self.long = np.asarray(lengths) >= LONG_TOKENS
        return self

    # -- querying ------------------------------------------------------------------------------
    def scores(self, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Cosine similarity of one unit query vector (term ids ``idx``, weights ``w``) to every row."""
        assert self.indptr is not None and self.rows is not None and self.vals is not None
        starts, ends = self.indptr[idx], self.indptr[idx + 1]
        sizes = ends - starts
        n = len(self.log_len) if self.log_len is not None else 0
        if not sizes.sum():
            return np.zeros(n, dtype=np.float64)
        pos = np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum())
        return np.bincount(self.rows[pos], weights=self.vals[pos].astype(np.float64) * np.repeat(w, sizes),
                           minlength=n)

    def summarise(self, sims: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """Features of the ``k`` most similar rows (``exclude``: a mask of rows not to use)."""
        assert self.log_len is not None and self.long is not None
        if exclude is not None:
            sims = np.where(exclude, -1.0, sims)
        if not (sims > 0).any():
            return np.full(len(NEIGHBOUR_NAMES), np.nan, dtype=np.float32)
        k = min(self.k, len(sims) - 1)
        top = np.argpartition(-sims, k)[:k] if k > 0 else np.arange(len(sims))
        top = top[np.lexsort((top, -sims[top]))]  # by similarity, ties by row: deterministic
        s = np.maximum(sims[top], 0.0)
        lens = self.log_len[top].astype(np.float64)
        out = [s[0], lens[0]]
        for m in (5, self.k):  # top 5, top k (fewer when the index is small)
            w = np.maximum(s[:m], 1e-6) ** 2
            mean = float((w * lens[:m]).sum() / w.sum())
            out += [mean, float(np.sqrt((w * (lens[:m] - mean) ** 2).sum() / w.sum()))]
        close = s >= CLOSE_SIM
        out += [s[:5].mean(), float(close.sum()), float(lens[close].mean()) if close.any() else np.nan]
        w = np.maximum(s[:10], 1e-6) ** 2
        out.append(float((w * self.long[top[:10]]).sum() / w.sum()))
        return np.array(out, dtype=np.float32)

    def features_counts(self, counts: sp.csr_matrix,
                        exclude: list[np.ndarray | None] | None = None) -> np.ndarray:
        """Features for each row of hashed counts; ``exclude[i]`` masks training rows for row i."""
        counts = counts.tocsr()
        out = np.empty((counts.shape[0], len(NEIGHBOUR_NAMES)), dtype=np.float32)
        for i, (idx, cnt) in enumerate(_rows(counts)):
            out[i] = self._features(idx, cnt, exclude[i] if exclude is not None else None)
        return out

    def features(self, texts: list[str]) -> np.ndarray:
        return self.features_counts(TextModel.counts(texts))

    def features_one(self, text: str) -> np.ndarray:
        """Same as ``features([text])[0]``, without building a sparse matrix (~1 ms)."""
        return self._features(*hashed_terms(text), None)

    def _features(self, idx: np.ndarray, cnt: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
        t, w = self.unit_vector(idx, cnt)
        return self.summarise(self.scores(t, w), exclude)


def _rows(counts: sp.csr_matrix) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(sorted term ids, counts) of each row."""
    counts.sort_indices()
    for i in range(counts.shape[0]):
        a, b = counts.indptr[i], counts.indptr[i + 1]
        yield counts.indices[a:b].astype(np.int64), counts.data[a:b]
