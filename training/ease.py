"""EASE (Steck 2019): a closed-form item-item linear model, the strongest model here on
MovieLens 100K.

B minimises ||X − XB||² + λ||B||² subject to diag(B) = 0, which has the closed form
B = I − P·diag(1/diag(P)) with P = (XᵀX + λI)⁻¹. One dense n_items x n_items inverse: fine
for catalogs up to a few tens of thousands of items, impossible for millions (use ALS there),
so `fit` refuses catalogs above `max_items` instead of running out of memory.

    model = EASE(regularization=400).fit(user_items)
    ids, scores = model.recommend(user, user_items, k=10)
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from training.recommender import Recommender

log = logging.getLogger(__name__)


class EASE(Recommender):
    """Scores are the user's history times the learned item-item weights B."""

    def __init__(self, regularization: float = 400.0, binary: bool = True, max_items: int = 30_000) -> None:
        if regularization <= 0:
            raise ValueError(f"regularization must be > 0, got {regularization}")
        self.regularization = float(regularization)
        self.binary = bool(binary)
        self.max_items = int(max_items)
        self.weights: np.ndarray | None = None

    def _input(self, rows: sp.csr_matrix) -> sp.csr_matrix:
        rows = sp.csr_matrix(rows, dtype=np.float32)
        return sp.csr_matrix(rows > 0, dtype=np.float32) if self.binary else rows

    def _fit(self, user_items: sp.csr_matrix) -> None:
        n_items = user_items.shape[1]
        if n_items > self.max_items:
            raise ValueError(
                f"EASE needs a dense {n_items} x {n_items} inverse; catalog above max_items={self.max_items}"
            )
        X = self._input(user_items).astype(np.float64)
        gram = np.asarray((X.T @ X).todense())
        gram[np.diag_indices(n_items)] += self.regularization
        P = np.linalg.inv(gram)
        B = P / (-np.diag(P))
        np.fill_diagonal(B, 0.0)
        self.weights = B.astype(np.float32)

    def _score(self, users: np.ndarray, items: np.ndarray | None, user_rows: sp.csr_matrix) -> np.ndarray:
        B = self.weights if items is None else self.weights[:, items]
        return np.asarray(self._input(user_rows) @ B)

    def _similar_scores(self, item: int) -> np.ndarray:
        # How strongly the two items predict each other, both ways. A negative weight is real
        # information (the items stand in for each other in histories), so it ranks below 0.
        return self.weights[item] + self.weights[:, item]

    def _fold_in(self, items: np.ndarray, counts: np.ndarray) -> np.ndarray:
        vector = np.zeros(self.n_items, dtype=np.float32)
        vector[items] = (counts > 0) if self.binary else counts
        return vector

    def _score_vector(self, vector: np.ndarray, items: np.ndarray | None) -> np.ndarray:
        B = self.weights if items is None else self.weights[:, items]
        return vector @ B
