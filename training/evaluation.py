"""Offline evaluation of recommenders: splits, top-k metrics and the fold-in check.

Two protocols, because numbers are only comparable within one:

(a) `random_split`: one global random permutation of the interactions, the first 80% train,
    every interaction positive, each user's training items excluded from the ranking, full
    ranking over the rest, k=10. This is the protocol behind the published MovieLens 100K
    numbers in DATA.md (Recommenders.jl); MostPop scores nDCG@10 0.2197 on it.
(b) `temporal_split`: per user, the last 20% of their events (by time) are the test set; a
    user with fewer than 1/fraction events keeps everything in train (there is nothing to
    hold out without emptying their history).

Metrics are computed for all evaluated users at once from a (users x k) matrix of
recommended ids: one sparse lookup gives the hit matrix, everything else is array arithmetic.

    train, test = random_split(user_items, test_fraction=0.2, seed=0)
    report = evaluate(model, train, test, k=10)
    report["ndcg"], report["precision"], report["coverage"]
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from training.recommender import Recommender, check_user_items

log = logging.getLogger(__name__)


# --- splits --------------------------------------------------------------------------------


def random_split(
    user_items: sp.spmatrix, test_fraction: float = 0.2, seed: int = 0
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Protocol (a): a random `test_fraction` of the stored interactions becomes the test set.

    Shapes are kept, so user and item ids mean the same in both halves. Explicit zeros are
    not interactions and are dropped first, so they never land in the test set.
    """
    _check_fraction(test_fraction)
    coo = check_user_items(user_items).tocoo()
    keep = coo.data > 0
    rows, cols, vals = coo.row[keep], coo.col[keep], coo.data[keep]
    order = np.random.default_rng(seed).permutation(len(rows))
    n_train = int(round(len(rows) * (1 - test_fraction)))
    train_idx, test_idx = order[:n_train], order[n_train:]
    return _csr(rows[train_idx], cols[train_idx], vals[train_idx], coo.shape), _csr(
        rows[test_idx], cols[test_idx], vals[test_idx], coo.shape
    )


def temporal_split(
    events: pd.DataFrame,
    test_fraction: float = 0.2,
    user_col: str = "user", item_col: str = "item", time_col: str = "timestamp", weight_col: str | None = None,
    shape: tuple[int, int] | None = None,
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Protocol (b): each user's last `floor(test_fraction * n_events)` events are the test set.

    `events` holds contiguous integer user and item indices (see `jobs.train_cf.index_ids`);
    ties in time are broken by row order, so the split is deterministic. Repeated (user, item)
    events add up in the matrix they fall in.
    """
    _check_fraction(test_fraction)
    for col in (user_col, item_col, time_col) + ((weight_col,) if weight_col else ()):
        if col not in events.columns:
            raise ValueError(f"events has no column {col!r} (columns: {list(events.columns)})")
    frame = events.reset_index(drop=True)
    order = np.lexsort((np.arange(len(frame)), frame[time_col].to_numpy(), frame[user_col].to_numpy()))
    users = frame[user_col].to_numpy()[order]
    # Position of each event within its user's time-ordered history, and that user's count.
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    position = np.arange(len(users)) - np.repeat(starts, counts)
    n_test = np.floor(counts * test_fraction + 1e-9).astype(np.int64)
    is_test = position >= np.repeat(counts - n_test, counts)
    items = frame[item_col].to_numpy()[order]
    weights = frame[weight_col].to_numpy()[order] if weight_col else np.ones(len(frame), dtype=np.float32)
    if shape is None:
        shape = (int(users.max()) + 1 if len(users) else 0, int(items.max()) + 1 if len(items) else 0)
    train = _csr(users[~is_test], items[~is_test], weights[~is_test], shape)
    test = _csr(users[is_test], items[is_test], weights[is_test], shape)
    return train, test


def _check_fraction(test_fraction: float) -> None:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _csr(rows, cols, vals, shape) -> sp.csr_matrix:
    """CSR with duplicate (row, col) pairs summed."""
    matrix = sp.csr_matrix((np.asarray(vals, dtype=np.float32), (rows, cols)), shape=shape)
    matrix.sum_duplicates()
    return matrix


# --- metrics -------------------------------------------------------------------------------


def hit_matrix(rec_ids: np.ndarray, test: sp.csr_matrix) -> np.ndarray:
    """Boolean (users x k): is the recommended item among that user's test items?

    `rec_ids` rows are aligned with `test` rows; id -1 (padding) is never a hit.
    """
    n_users, k = rec_ids.shape
    valid = rec_ids >= 0
    rows = np.repeat(np.arange(n_users), k)
    cols = np.where(valid, rec_ids, 0).ravel()
    looked_up = np.asarray(test[rows, cols]).reshape(n_users, k)
    return (looked_up > 0) & valid


def ranking_metrics(
    rec_ids: np.ndarray,
    test: sp.csr_matrix,
    k: int = 10,
    train: sp.csr_matrix | None = None,
    item_vectors: np.ndarray | None = None,
) -> dict[str, float]:
    """Precision, recall, nDCG, MAP and hit rate @k, averaged over users with test items.

    `rec_ids` is (n_users, >=k) aligned with the rows of `test`. Definitions follow the
    protocol (a) numbers: precision divides by k; nDCG's ideal DCG and MAP's normaliser use
    min(k, number of test items). With `train`, also catalog coverage (share of items
    recommended to anyone) and novelty (mean -log2 of the share of training users who know the
    item). With `item_vectors` (e.g. genres or factors), intra-list diversity: the mean
    pairwise cosine distance within each list.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rec_ids = np.asarray(rec_ids)
    test = sp.csr_matrix(test)
    if rec_ids.ndim != 2 or rec_ids.shape[0] != test.shape[0]:
        raise ValueError(f"rec_ids has shape {rec_ids.shape}, expected ({test.shape[0]}, k)")
    if rec_ids.shape[1] < k:
        pad = np.full((rec_ids.shape[0], k - rec_ids.shape[1]), -1, dtype=rec_ids.dtype)
        rec_ids = np.hstack([rec_ids, pad])
    rec_ids = rec_ids[:, :k]
    n_relevant = np.diff(sp.csr_matrix(test > 0).indptr)
    evaluated = n_relevant > 0
    if not evaluated.any():
        raise ValueError("the test set has no interactions: nothing to evaluate")
    rec_ids, n_relevant = rec_ids[evaluated], n_relevant[evaluated]
    hits = hit_matrix(rec_ids, test[evaluated]).astype(np.float64)

    n_hits = hits.sum(axis=1)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, k) - 1]
    precision_at_rank = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    out = {
        "precision": float(np.mean(n_hits / k)),
        "recall": float(np.mean(n_hits / n_relevant)),
        "ndcg": float(np.mean((hits @ discounts) / ideal)),
        "map": float(np.mean((precision_at_rank * hits).sum(axis=1) / np.minimum(n_relevant, k))),
        "hit_rate": float(np.mean(n_hits > 0)),
        "users": int(evaluated.sum()),
    }
    recommended = rec_ids[rec_ids >= 0]
    if train is not None:
        n_items = train.shape[1]
        out["coverage"] = float(len(np.unique(recommended)) / n_items) if n_items else 0.0
        out["novelty"] = novelty(rec_ids, train)
    if item_vectors is not None:
        out["diversity"] = intra_list_diversity(rec_ids, item_vectors)
    return out


def novelty(rec_ids: np.ndarray, train: sp.csr_matrix) -> float:
    """Mean self-information -log2(p(i)) of recommended items, p(i) = share of users who know i.

    Items nobody knows in train get p = 1/n_users (the rarest observable), not infinity.
    """
    train = sp.csr_matrix(train)
    n_users = max(train.shape[0], 1)
    known_by = np.diff(sp.csc_matrix(train > 0).indptr)
    p = np.maximum(known_by, 1) / n_users
    valid = rec_ids >= 0
    return float(np.mean(-np.log2(p[rec_ids[valid]]))) if valid.any() else 0.0


def intra_list_diversity(rec_ids: np.ndarray, item_vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance within each list, averaged over lists with >= 2 items.

    Pairwise sums come from ||Σe||² = Σ||e||² + 2·Σ_{i<j} eᵢ·eⱼ on unit vectors, so no
    k x k matrix per user is built. Zero vectors (an item without genres) count as orthogonal.
    """
    vectors = np.asarray(item_vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    valid = rec_ids >= 0
    embedded = unit[np.where(valid, rec_ids, 0)] * valid[..., None]
    n = valid.sum(axis=1)
    total = embedded.sum(axis=1)
    pair_sim = (np.einsum("ij,ij->i", total, total) - np.einsum("ijk,ijk->i", embedded, embedded)) / 2
    pairs = n * (n - 1) / 2
    lists = pairs > 0
    if not lists.any():
        return 0.0
    return float(np.mean(1 - pair_sim[lists] / pairs[lists]))


def evaluate(
    model: Recommender,
    train: sp.csr_matrix,
    test: sp.csr_matrix,
    k: int = 10,
    item_vectors: np.ndarray | None = None,
) -> dict[str, float]:
    """Rank every unseen item for each user with test items and score the top k."""
    test = sp.csr_matrix(test)
    users = np.flatnonzero(np.diff(sp.csr_matrix(test > 0).indptr))
    if users.size == 0:
        raise ValueError("the test set has no interactions: nothing to evaluate")
    ids, _ = model.recommend_batch(users, train, k=k, filter_seen=True)
    return ranking_metrics(ids, test[users], k=k, train=train, item_vectors=item_vectors)


# --- fold-in against a retrain -------------------------------------------------------------


def fold_in_split(
    user_items: sp.csr_matrix, user_fraction: float = 0.1, first_fraction: float = 0.5, seed: int = 0,
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, sp.csr_matrix, sp.csr_matrix]:
    """Pick held-out users and split each one's plays into "first" (known) and "rest" (test).

    Returns (held-out users, first plays, remaining plays) with the full matrix's shape.
    `order` (same length as the stored entries of the CSR) ranks each row's plays in time;
    without it, a seeded random order stands in.
    """
    csr = check_user_items(user_items)
    csr.eliminate_zeros()
    rng = np.random.default_rng(seed)
    active = np.flatnonzero(np.diff(csr.indptr) >= 2)
    n_held = max(1, int(round(user_fraction * len(active))))
    held = np.sort(rng.choice(active, size=min(n_held, len(active)), replace=False))
    coo = csr.tocoo()
    rank_key = rng.random(csr.nnz) if order is None else np.asarray(order)
    by_time = np.lexsort((rank_key, coo.row))
    rows, cols, vals = coo.row[by_time], coo.col[by_time], coo.data[by_time]
    starts = csr.indptr[:-1]
    counts = np.diff(csr.indptr)
    position = np.arange(len(rows)) - np.repeat(starts, counts)
    n_first = np.maximum(1, np.floor(counts * first_fraction)).astype(np.int64)
    is_held = np.isin(rows, held)
    first = is_held & (position < np.repeat(n_first, counts))
    rest = is_held & ~first
    return held, _csr(rows[first], cols[first], vals[first], csr.shape), _csr(rows[rest], cols[rest], vals[rest], csr.shape)


def fold_in_vs_retrain(
    make_model, user_items: sp.csr_matrix, k: int = 10, user_fraction: float = 0.1,
    first_fraction: float = 0.5, seed: int = 0, order: np.ndarray | None = None,
) -> dict[str, float]:
    """nDCG@k of held-out users ranked from `fold_in` of their first plays, against a full
    retrain that includes those first plays (the upper bound fold-in approximates).

    The fold-in model never sees the held-out users (their rows are emptied). One
    `recommend_fold_in` call per held-out user: that per-request path is what is measured.
    """
    held, first, rest = fold_in_split(user_items, user_fraction, first_fraction, seed, order)
    csr = check_user_items(user_items)
    others = csr.multiply(sp.csr_matrix((~np.isin(np.arange(csr.shape[0]), held)).astype(np.float32)[:, None]))
    others = sp.csr_matrix(others)
    others.eliminate_zeros()
    without = make_model().fit(others)
    ids = np.full((len(held), k), -1, dtype=np.int64)
    for row, user in enumerate(held):
        plays = first[user]
        found, _ = without.recommend_fold_in(plays.indices, plays.data, k=k)
        ids[row, : len(found)] = found
    folded = ranking_metrics(ids, rest[held], k=k)["ndcg"]
    retrained = make_model().fit(sp.csr_matrix(others + first))
    retrain_ids, _ = retrained.recommend_batch(held, others + first, k=k)
    full = ranking_metrics(retrain_ids, rest[held], k=k)["ndcg"]
    return {"ndcg_fold_in": folded, "ndcg_retrain": full, "ratio": folded / full if full else float("nan"),
            "users": int(len(held))}
