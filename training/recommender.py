"""The one interface every EchoTune recommender implements, in the spirit of implicit's
`RecommenderBase`: `fit` on a users x items matrix, then `recommend`, `recommend_batch` and
`similar_items`.

Validation and top-k selection live here, once, so that every model rejects bad input with the
same `ValueError` and breaks ties the same way; a model only says how it scores items.
The shared contract suite is `tests/test_recommenders.py`.

    model = ImplicitALS(factors=32).fit(user_items)
    ids, scores = model.recommend(user=3, user_items=user_items, k=10)
    ids, scores = model.recommend_fold_in([4, 8, 15])   # a listener the model has not seen

An unknown user raises `UnknownUserError` (a ValueError) so that serving can fall back to its
cold-start path instead of guessing.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

BATCH_CHUNK = 1024
"""Users scored per dense block in `recommend_batch`; bounds memory at chunk x n_items floats."""


def check_user_items(
    user_items, shape: tuple[int, int] | None = None, check_values: bool = True
) -> sp.csr_matrix:
    """Return `user_items` as float32 CSR, or raise a ValueError that names what is wrong.

    Done at every entry point because a dense array, a transposed matrix or a negative weight
    otherwise produces plausible-looking but meaningless recommendations rather than an error.
    `check_values=False` skips the O(nnz) value scan when the caller checks only the rows it uses.
    """
    if not sp.issparse(user_items):
        raise ValueError(f"user_items must be a scipy.sparse matrix, got {type(user_items).__name__}")
    if user_items.ndim != 2:
        raise ValueError(f"user_items must be 2-D, got shape {user_items.shape}")
    if shape is not None and tuple(user_items.shape) != tuple(shape):
        raise ValueError(
            f"user_items has shape {tuple(user_items.shape)}, expected {tuple(shape)} "
            "(users x items of the fitted model)"
        )
    csr = sp.csr_matrix(user_items, dtype=np.float32)
    if check_values:
        check_weights(csr.data, "user_items")
    return csr


def seen_rows(user_items, users: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """The rows of `users`, validated; only those rows' values are scanned."""
    rows = check_user_items(user_items, shape, check_values=False)[users]
    check_weights(rows.data, "user_items")
    return rows


def check_weights(values: np.ndarray, what: str) -> None:
    """Interaction weights are counts: negative or non-finite values are a bug upstream."""
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contains NaN or infinite values")
    if values.min() < 0:
        raise ValueError(f"{what} contains negative values (min {values.min()}); weights must be >= 0")


def top_k(
    scores: np.ndarray, k: int, item_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Best-first top k of each row of `scores` (2-D), ties broken by the smaller item id.

    Entries scored -inf are filtered items; they come back as id -1 / score -inf so that a batch
    keeps a rectangular shape. `item_ids` maps columns to item ids when only a candidate subset
    was scored. Shared by single and batch paths so both return exactly the same ranking.
    """
    n_rows, n_cols = scores.shape
    ids = np.arange(n_cols) if item_ids is None else np.asarray(item_ids)
    k = min(k, n_cols)
    if k == 0:
        return np.empty((n_rows, 0), dtype=np.int64), np.empty((n_rows, 0), dtype=scores.dtype)
    if k < n_cols:
        cols = _with_smallest_tied_ids(scores, np.argpartition(-scores, k - 1, axis=1)[:, :k], ids)
    else:
        cols = np.broadcast_to(np.arange(n_cols), (n_rows, n_cols))
    picked = np.take_along_axis(scores, cols, axis=1)
    order = np.lexsort((ids[cols], -picked), axis=-1)
    cols = np.take_along_axis(cols, order, axis=1)
    best = np.take_along_axis(picked, order, axis=1)
    out_ids = ids[cols].astype(np.int64)
    out_ids[np.isneginf(best)] = -1
    return out_ids, best


def _with_smallest_tied_ids(scores: np.ndarray, cols: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`cols` (an argpartition's k best columns per row), with the items tied at the k-th
    score chosen by smallest id.

    argpartition keeps an arbitrary subset of the items tied at the k-th place, which sorting
    what it kept cannot repair. Only rows with such a tie left out (more than k columns score
    at least the k-th score) are redone, so the common case costs one comparison pass. Ties at
    -inf are left alone: filtered items come back as id -1 whichever they are.
    """
    k = cols.shape[1]
    kth = np.take_along_axis(scores, cols, axis=1).min(axis=1, keepdims=True)
    rows = np.flatnonzero((np.count_nonzero(scores >= kth, axis=1) > k) & (kth[:, 0] > -np.inf))
    if rows.size == 0:
        return cols
    by_id = None if np.all(ids[:-1] <= ids[1:]) else np.argsort(ids, kind="stable")
    sub, kth = scores[rows], kth[rows]
    if by_id is not None:
        sub = sub[:, by_id]  # columns in id order, so the first tied ones are the smallest ids
    above, tied = sub > kth, sub == kth
    wanted = k - np.count_nonzero(above, axis=1)[:, None]
    keep = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= wanted))
    kept = np.nonzero(keep)[1].reshape(len(rows), k)
    cols = np.array(cols)
    cols[rows] = kept if by_id is None else by_id[kept]
    return cols


def cosine_to(vectors: np.ndarray, norms: np.ndarray, item: int) -> np.ndarray:
    """Cosine similarity of every row of `vectors` to row `item` (0 for zero vectors).

    Factor models use it for `similar_items`: raw dot products would favour long (popular) items.
    """
    denom = norms * norms[item]
    dots = vectors @ vectors[item]
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


class UnknownUserError(ValueError):
    """The user is not in the fitted model: the serving layer answers with its cold-start path.

    A ValueError subclass so that callers who only check input still catch it.
    """


class Recommender(ABC):
    """Fit on weighted implicit feedback, then rank items for users.

    Subclasses implement `_fit`, `_score(users, items, user_rows)`, `_similar_scores(item)`,
    `_fold_in(items, counts)` and `_score_vector(vector, items)`; this base class does
    validation, seen-item filtering and top-k selection.
    """

    n_users: int | None = None
    n_items: int | None = None

    # --- what a model implements -------------------------------------------------------
    @abstractmethod
    def _fit(self, user_items: sp.csr_matrix) -> None:
        """Learn from validated, non-negative float32 CSR interactions."""

    @abstractmethod
    def _score(self, users: np.ndarray, items: np.ndarray | None, user_rows: sp.csr_matrix) -> np.ndarray:
        """Dense (len(users), n_items or len(items)) scores; higher is better.

        `user_rows` are those users' rows of the `user_items` passed to `recommend`: item-based
        models score from them (so a newer history counts at once), factor models ignore them.
        """

    @abstractmethod
    def _fold_in(self, items: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """A user representation from summed weights `counts` on distinct item ids `items`."""

    @abstractmethod
    def _score_vector(self, vector: np.ndarray, items: np.ndarray | None) -> np.ndarray:
        """Scores (n_items or len(items)) of every item for a `fold_in` representation."""

    @abstractmethod
    def _similar_scores(self, item: int) -> np.ndarray:
        """Similarity of every item to `item` (length n_items)."""

    # --- the public interface ----------------------------------------------------------
    def fit(self, user_items: sp.csr_matrix) -> "Recommender":
        """Learn from a users x items matrix of weighted interaction counts (>= 0)."""
        csr = check_user_items(user_items)
        started = time.perf_counter()
        self.n_users, self.n_items = csr.shape
        try:
            self._fit(csr)
        except BaseException:
            self.n_users = self.n_items = None  # a failed fit must not look fitted
            raise
        log.debug(
            "%s fitted on %d users x %d items (%d non-zeros) in %.3fs",
            type(self).__name__, *csr.shape, csr.nnz, time.perf_counter() - started,
        )
        return self

    def recommend(
        self,
        user: int,
        user_items: sp.csr_matrix,
        k: int = 10,
        filter_seen: bool = True,
        candidates: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (item ids, scores) for one user, best first.

        `user_items` is the full users x items matrix (the one fitted, or a newer one of the same
        shape). With `candidates`, only those item ids are ranked (e.g. after a retrieval stage).
        Fewer than k items come back when filtering leaves fewer.
        """
        self._check_fitted()
        self._check_k(k)
        user = self._check_user(user)
        row = seen_rows(user_items, np.array([user]), (self.n_users, self.n_items))
        items = None if candidates is None else self._check_candidates(candidates)
        scores = np.asarray(self._score(np.array([user]), items, row), dtype=np.float32).copy()
        if filter_seen:
            seen = row.indices[row.data > 0]
            if items is None:
                scores[0, seen] = -np.inf
            else:
                scores[0, np.isin(items, seen)] = -np.inf
        ids, best = top_k(scores, k, items)
        keep = ids[0] >= 0
        return ids[0][keep], best[0][keep]

    def recommend_batch(
        self,
        users: np.ndarray,
        user_items: sp.csr_matrix,
        k: int = 10,
        filter_seen: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for many users at once: arrays of shape (len(users), min(k, n_items)).

        Rows with fewer than k eligible items are padded with id -1 and score -inf.
        """
        self._check_fitted()
        self._check_k(k)
        users = _id_array(users, self.n_users, "users", "a 1-D array of user ids", "user", UnknownUserError)
        csr = check_user_items(user_items, (self.n_users, self.n_items), check_values=False)
        width = min(k, self.n_items)
        out_ids = np.empty((len(users), width), dtype=np.int64)
        out_scores = np.empty((len(users), width), dtype=np.float32)
        for start in range(0, len(users), BATCH_CHUNK):
            chunk = users[start : start + BATCH_CHUNK]
            rows = csr[chunk]
            check_weights(rows.data, "user_items")
            scores = np.asarray(self._score(chunk, None, rows), dtype=np.float32).copy()
            if filter_seen:
                mask = rows.data > 0
                row_of = np.repeat(np.arange(len(chunk)), np.diff(rows.indptr))
                scores[row_of[mask], rows.indices[mask]] = -np.inf
            ids, best = top_k(scores, k)
            out_ids[start : start + len(chunk)] = ids
            out_scores[start : start + len(chunk)] = best
        return out_ids, out_scores

    def similar_items(self, item: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items most like `item`, best first, never including `item` itself."""
        self._check_fitted()
        self._check_k(k)
        item = self._check_item(item)
        scores = np.asarray(self._similar_scores(item), dtype=np.float32).copy()
        scores[item] = -np.inf
        ids, best = top_k(scores[None, :], k)
        keep = ids[0] >= 0
        return ids[0][keep], best[0][keep]

    def fold_in(self, item_ids, weights=None) -> np.ndarray:
        """A user representation from plays the model never saw (a new or changed listener).

        Repeated ids add up, as they would in the interaction matrix. For factor models this is
        a factor vector (ALS: the exact user half-step); for item-based models the weighted
        history itself. Rank with `recommend_fold_in`.
        """
        self._check_fitted()
        items, counts = self._check_plays(item_ids, weights)
        return self._fold_in(items, counts)

    def recommend_fold_in(
        self,
        item_ids,
        weights=None,
        k: int = 10,
        filter_seen: bool = True,
        candidates: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (item ids, scores) for a listener known only by `item_ids` (the cold-start path)."""
        self._check_fitted()
        self._check_k(k)
        items, counts = self._check_plays(item_ids, weights)
        vector = self._fold_in(items, counts)
        subset = None if candidates is None else self._check_candidates(candidates)
        scores = np.asarray(self._score_vector(vector, subset), dtype=np.float32).copy()[None, :]
        if filter_seen:
            seen = items[counts > 0]
            if subset is None:
                scores[0, seen] = -np.inf
            else:
                scores[0, np.isin(subset, seen)] = -np.inf
        ids, best = top_k(scores, k, subset)
        keep = ids[0] >= 0
        return ids[0][keep], best[0][keep]

    # --- validation ------------------------------------------------------------------
    def _check_plays(self, item_ids, weights) -> tuple[np.ndarray, np.ndarray]:
        """Distinct item ids and their summed weights, or a ValueError naming the problem."""
        ids = _id_array(item_ids, self.n_items, "item_ids", "1-D", "item", ValueError)
        if weights is None:
            w = np.ones(len(ids), dtype=np.float64)
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != ids.shape:
                raise ValueError(f"weights has shape {w.shape}, item_ids has shape {ids.shape}")
            check_weights(w, "weights")
        items, inverse = np.unique(ids, return_inverse=True)
        counts = np.bincount(inverse, weights=w, minlength=len(items)) if ids.size else np.zeros(0)
        return items, counts


    @property
    def is_fitted(self) -> bool:
        return self.n_users is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError(f"{type(self).__name__} is not fitted: call fit() first")

    @staticmethod
    def _check_k(k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k must be an integer, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")

    def _check_user(self, user: int) -> int:
        if isinstance(user, bool) or not isinstance(user, (int, np.integer)):
            raise ValueError(f"user must be an integer id, got {user!r}")
        if not 0 <= user < self.n_users:
            raise UnknownUserError(f"user {user} out of range [0, {self.n_users})")
        return int(user)

    def _check_item(self, item: int) -> int:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise ValueError(f"item must be an integer id, got {item!r}")
        if not 0 <= item < self.n_items:
            raise ValueError(f"item {item} out of range [0, {self.n_items})")
        return int(item)

    def _check_candidates(self, candidates: np.ndarray) -> np.ndarray:
        items = np.asarray(candidates)
        if items.ndim != 1:
            raise ValueError(f"candidates must be a 1-D array of item ids, got shape {items.shape}")
        if items.size and not np.issubdtype(items.dtype, np.integer):
            raise ValueError(f"candidates must be integer item ids, got dtype {items.dtype}")
        items = np.unique(items.astype(np.int64))
        if items.size and (items[0] < 0 or items[-1] >= self.n_items):
            bad = items[0] if items[0] < 0 else items[-1]
            raise ValueError(f"candidate item {bad} out of range [0, {self.n_items})")
        return items


def _id_array(values, upper: int, name: str, shape: str, unit: str, out_of_range: type[ValueError]) -> np.ndarray:
    """`values` as int64 ids in [0, upper), or a ValueError naming the problem."""
    ids = np.asarray(values)
    if ids.ndim != 1:
        raise ValueError(f"{name} must be {shape}, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= upper):
        bad = ids[(ids < 0) | (ids >= upper)][0]
        raise out_of_range(f"{unit} {bad} out of range [0, {upper})")
    return ids
