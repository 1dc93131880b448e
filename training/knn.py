"""Item-based k-nearest-neighbours: cosine similarity between items' listener vectors.

The classic baseline (published ItemKNN: nDCG@10 0.3986 on MovieLens 100K, protocol (a);
this one, BM25 and 200 neighbours: 0.3906 ± 0.0021 over 5 splits). Each item keeps only its
`neighbors` most similar items (cosine, optionally on BM25-weighted plays), so the model is
a sparse items x items matrix; a user's scores are their history times it.
Scoring uses the `user_items` passed to `recommend`, so a fresh play counts without a refit.

    model = ItemKNN(neighbors=100, bm25=True).fit(user_items)
    ids, scores = model.recommend(user, user_items, k=10)
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from training.recommender import Recommender

log = logging.getLogger(__name__)


def bm25_weight(user_items: sp.csr_matrix, k1: float = 100.0, b: float = 0.8) -> sp.csr_matrix:
    """Okapi BM25 weighting of a users x items matrix (implicit's `bm25_weight`, by rows).

    Down-weights items everyone plays and saturates heavy repeat counts, which is what makes
    co-occurrence similarities on listening data useful.
    """
    csr = sp.csr_matrix(user_items, dtype=np.float64, copy=True)
    n_users = csr.shape[0]
    df = np.diff(sp.csc_matrix(csr).indptr)
    idf = np.log(n_users / (1.0 + df))
    row_sums = np.asarray(csr.sum(axis=1)).ravel()
    average = row_sums.mean() if n_users and row_sums.mean() > 0 else 1.0
    length_norm = (1.0 - b) + b * row_sums / average
    rows = np.repeat(np.arange(n_users), np.diff(csr.indptr))
    csr.data = csr.data * (k1 + 1.0) / (k1 * length_norm[rows] + csr.data) * idf[csr.indices]
    return csr


def keep_top_per_row(matrix: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """The `n` largest entries of each row (ties to the smaller column), vectorised."""
    csr = sp.csr_matrix(matrix)
    csr.eliminate_zeros()
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
    order = np.lexsort((csr.indices, -csr.data, rows))
    position = np.arange(len(order)) - np.repeat(csr.indptr[:-1], np.diff(csr.indptr))
    keep = order[position < n]
    return sp.csr_matrix((csr.data[keep], (rows[keep], csr.indices[keep])), shape=csr.shape)


class ItemKNN(Recommender):
    """Scores item i for a user by Σ_j weight(user, j) · cos(i, j) over their played items j."""

    def __init__(self, neighbors: int = 100, shrinkage: float = 0.0, bm25: bool = False) -> None:
        if neighbors < 1:
            raise ValueError(f"neighbors must be >= 1, got {neighbors}")
        if shrinkage < 0:
            raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
        self.neighbors = int(neighbors)
        self.shrinkage = float(shrinkage)
        self.bm25 = bool(bm25)
        self.similarity: sp.csr_matrix | None = None

    def _weigh(self, rows: sp.csr_matrix) -> sp.csr_matrix:
        return bm25_weight(rows) if self.bm25 else sp.csr_matrix(rows, dtype=np.float64)

    def _fit(self, user_items: sp.csr_matrix) -> None:
        X = sp.csc_matrix(self._weigh(user_items))
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=0)).ravel())
        gram = sp.csr_matrix(X.T @ X)
        gram.setdiag(0)
        rows = np.repeat(np.arange(gram.shape[0]), np.diff(gram.indptr))
        # Shrinkage pulls similarities estimated from few co-listeners towards 0.
        denom = norms[rows] * norms[gram.indices] + self.shrinkage
        gram.data = np.divide(gram.data, denom, out=np.zeros_like(gram.data), where=denom > 0)
        self.similarity = keep_top_per_row(gram, self.neighbors).astype(np.float32)
        log.debug("ItemKNN kept %d of %d similarities", self.similarity.nnz, gram.nnz)

    def _score(self, users: np.ndarray, items: np.ndarray | None, user_rows: sp.csr_matrix) -> np.ndarray:
        # The raw history, as implicit's ItemItemRecommender does: BM25 only shapes the
        # similarities (a single row has no corpus to compute idf from).
        S = self.similarity if items is None else self.similarity[:, items]
        return np.asarray((sp.csr_matrix(user_rows, dtype=np.float32) @ S).todense())

    def _similar_scores(self, item: int) -> np.ndarray:
        return self.similarity[item].toarray().ravel()

    def _fold_in(self, items: np.ndarray, counts: np.ndarray) -> np.ndarray:
        vector = np.zeros(self.n_items, dtype=np.float32)
        vector[items] = counts
        return vector

    def _score_vector(self, vector: np.ndarray, items: np.ndarray | None) -> np.ndarray:
        S = self.similarity if items is None else self.similarity[:, items]
        return np.asarray(S.T @ vector).ravel()
