"""Non-negative matrix factorisation (scikit-learn), the CF trainer the project started with.

X ≈ W·H with W, H ≥ 0 on the weighted interaction matrix, scores W[u]·H. Unlike ALS it
weighs every missing entry like an observed zero, which is why it ranks below ALS on implicit
data; it stays as a parts-based, easily explained baseline.

    model = NMFRecommender(factors=32).fit(user_items)
    ids, scores = model.recommend(user, user_items, k=10)
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning

from training.recommender import Recommender, cosine_to

log = logging.getLogger(__name__)


class NMFRecommender(Recommender):
    def __init__(
        self, factors: int = 32, regularization: float = 0.0, l1_ratio: float = 0.0, max_iter: int = 200, seed: int = 0
    ) -> None:
        if factors < 1:
            raise ValueError(f"factors must be >= 1, got {factors}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        if not 0 <= l1_ratio <= 1:
            raise ValueError(f"l1_ratio must be in [0, 1], got {l1_ratio}")
        self.factors = int(factors)
        self.regularization = float(regularization)
        self.l1_ratio = float(l1_ratio)
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        self._nmf: NMF | None = None
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None

    def _fit(self, user_items: sp.csr_matrix) -> None:
        n_components = min(self.factors, *user_items.shape)
        self._nmf = NMF(
            n_components=n_components,
            init="nndsvda",
            alpha_W=self.regularization,
            alpha_H="same",
            l1_ratio=self.l1_ratio,
            max_iter=self.max_iter,
            random_state=self.seed,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            W = self._nmf.fit_transform(user_items.astype(np.float64))
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            log.info("NMF stopped at max_iter=%d before converging", self.max_iter)
        self.user_factors = W.astype(np.float32)
        self.item_factors = np.ascontiguousarray(self._nmf.components_.T, dtype=np.float32)
        self._item_norms = np.linalg.norm(self.item_factors, axis=1)

    def _score(self, users: np.ndarray, items: np.ndarray | None, user_rows: sp.csr_matrix) -> np.ndarray:
        H = self.item_factors if items is None else self.item_factors[items]
        return self.user_factors[users] @ H.T

    def _similar_scores(self, item: int) -> np.ndarray:
        return cosine_to(self.item_factors, self._item_norms, item)

    def _fold_in(self, items: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """sklearn's `transform`: the non-negative W row for fixed H."""
        row = sp.csr_matrix((counts, (np.zeros(len(items), dtype=np.int64), items)), shape=(1, self.n_items))
        return self._nmf.transform(row).ravel().astype(np.float32)

    def _score_vector(self, vector: np.ndarray, items: np.ndarray | None) -> np.ndarray:
        H = self.item_factors if items is None else self.item_factors[items]
        return H @ vector
