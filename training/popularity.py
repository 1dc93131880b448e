"""Most-popular baseline: the last link of the fallback chain and the yardstick CF must beat.

    model = Popularity().fit(user_items)
    ids, scores = model.recommend(user, user_items, k=10)
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from training.recommender import Recommender

log = logging.getLogger(__name__)


class Popularity(Recommender):
    """Scores every item by its total weighted interactions, the same for every user.

    The user only matters for `filter_seen`. `similar_items` returns the most popular other
    items: a baseline has no notion of similarity, and popular items are what it would show.
    """

    def __init__(self) -> None:
        self.item_scores: np.ndarray | None = None

    def _fit(self, user_items: sp.csr_matrix) -> None:
        self.item_scores = np.asarray(user_items.sum(axis=0), dtype=np.float64).ravel().astype(np.float32)
        log.debug("Popularity over %d items, %d interactions", self.n_items, user_items.nnz)

    def _score(self, users: np.ndarray, items: np.ndarray | None, user_rows: sp.csr_matrix) -> np.ndarray:
        scores = self.item_scores if items is None else self.item_scores[items]
        return np.broadcast_to(scores, (len(users), len(scores)))

    def _fold_in(self, items: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Popularity has no user state: the representation is empty."""
        return np.zeros(0, dtype=np.float32)

    def _score_vector(self, vector: np.ndarray, items: np.ndarray | None) -> np.ndarray:
        return self.item_scores if items is None else self.item_scores[items]

    def _similar_scores(self, item: int) -> np.ndarray:
        return self.item_scores
