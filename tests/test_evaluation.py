"""The evaluation harness on tiny data whose metrics are worked out by hand. No Ray.

    .venv/bin/pytest tests/test_evaluation.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from training.evaluation import (
    evaluate,
    fold_in_split,
    hit_matrix,
    intra_list_diversity,
    random_split,
    ranking_metrics,
    temporal_split,
)
from training.popularity import Popularity


def matrix(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    """Binary users x items matrix from each user's list of items."""
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(c), dtype=np.float32), (r, c)), shape=(len(rows), n_items))


def test_metrics_known_answer():
    """User 0: hits at ranks 1 and 3 of 3, 2 relevant. User 1: one hit at rank 2, 4 relevant.
    User 2 has no test items and is not evaluated."""
    test = matrix([[5, 7], [1, 2, 3, 4], []], n_items=8)
    recs = np.array([[5, 0, 7], [0, 3, 6], [1, 2, 3]])
    m = ranking_metrics(recs, test, k=3)
    d = [1 / math.log2(r + 1) for r in (1, 2, 3)]
    assert m["users"] == 2
    assert m["precision"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["recall"] == pytest.approx((2 / 2 + 1 / 4) / 2)
    ndcg0 = (d[0] + d[2]) / (d[0] + d[1])  # ideal over min(k, 2 relevant)
    ndcg1 = d[1] / (d[0] + d[1] + d[2])  # ideal over min(k, 4 relevant) = 3
    assert m["ndcg"] == pytest.approx((ndcg0 + ndcg1) / 2)
    map0 = (1 / 1 + 2 / 3) / 2
    map1 = (1 / 2) / 3
    assert m["map"] == pytest.approx((map0 + map1) / 2)
    assert m["hit_rate"] == 1.0


def test_perfect_and_empty_rankings():
    test = matrix([[1, 2], [3]], n_items=5)
    perfect = ranking_metrics(np.array([[2, 1, 0], [3, 0, 1]]), test, k=3)
    assert perfect["ndcg"] == pytest.approx(1.0) and perfect["recall"] == 1.0 and perfect["map"] == pytest.approx(1.0)
    padded = ranking_metrics(np.array([[-1, -1, -1], [-1, -1, -1]]), test, k=3)
    assert padded["ndcg"] == 0.0 and padded["hit_rate"] == 0.0  # -1 padding is never a hit, even of item 0


def test_short_lists_are_padded():
    test = matrix([[0]], n_items=3)
    assert ranking_metrics(np.array([[0]]), test, k=10)["precision"] == pytest.approx(0.1)


def test_hit_matrix():
    test = matrix([[0, 2], [1]], n_items=3)
    np.testing.assert_array_equal(hit_matrix(np.array([[2, -1], [0, 1]]), test), [[True, False], [False, True]])


def test_coverage_novelty_diversity():
    train = matrix([[0, 1], [0], [0, 2], [0]], n_items=4)
    test = matrix([[3], [3], [3], [3]], n_items=4)
    recs = np.array([[3, 2], [3, 1], [3, 2], [3, 1]])
    genres = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=float)
    m = ranking_metrics(recs, test, k=2, train=train, item_vectors=genres)
    assert m["coverage"] == pytest.approx(3 / 4)  # items 1, 2, 3
    # p(3) = 1/4 (unknown: counted as the rarest), p(1) = p(2) = 1/4 → 2 bits each.
    assert m["novelty"] == pytest.approx(2.0)
    # lists {3,2} differ in genre (distance 1), lists {3,1} share it (distance 0).
    assert m["diversity"] == pytest.approx(0.5)


def test_diversity_matches_pairwise_loop():
    rng = np.random.default_rng(0)
    vectors = rng.random((20, 4))
    recs = rng.integers(0, 20, size=(5, 6))
    recs[0, 4:] = -1
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = []
    for row in recs:
        row = row[row >= 0]
        sims = [unit[a] @ unit[b] for i, a in enumerate(row) for b in row[i + 1:]]
        expected.append(1 - np.mean(sims))
    assert intra_list_diversity(recs, vectors) == pytest.approx(np.mean(expected))


def test_metrics_bad_input():
    test = matrix([[0]], n_items=2)
    with pytest.raises(ValueError, match="rec_ids"):
        ranking_metrics(np.array([[0], [1]]), test, k=1)
    with pytest.raises(ValueError, match="no interactions"):
        ranking_metrics(np.array([[0]]), matrix([[]], n_items=2), k=1)
    with pytest.raises(ValueError, match="k must be"):
        ranking_metrics(np.array([[0]]), test, k=0)


def test_random_split_partitions_interactions():
    full = sp.random(40, 30, density=0.3, random_state=2, format="csr", dtype=np.float32)
    train, test = random_split(full, test_fraction=0.2, seed=3)
    assert train.shape == test.shape == full.shape
    assert train.nnz + test.nnz == full.nnz
    assert test.nnz == round(0.2 * full.nnz)
    assert (train.multiply(test)).nnz == 0
    assert abs(train + test - full).max() == 0
    again, _ = random_split(full, test_fraction=0.2, seed=3)
    assert (again != train).nnz == 0  # same seed, same split
    with pytest.raises(ValueError, match="test_fraction"):
        random_split(full, test_fraction=1.0)


def test_temporal_split_holds_out_each_users_last_events():
    events = pd.DataFrame(
        {
            "user": [0] * 10 + [1] * 3,
            "item": list(range(10)) + [0, 1, 1],  # user 1 plays item 1 twice
            "timestamp": list(range(10, 0, -1)) + [1, 2, 3],  # user 0's events in reverse time
        }
    )
    train, test = temporal_split(events, test_fraction=0.2)
    assert sorted(test[0].indices.tolist()) == [0, 1]  # the two latest (timestamps 10 and 9)
    assert train[0].nnz == 8
    assert test[1].nnz == 0 and train[1, 1] == 2  # 3 events: floor(0.6) = 0 held out; repeats add up


def test_evaluate_popularity_end_to_end():
    train = matrix([[0, 1], [0, 2], [0], [1]], n_items=4)
    test = matrix([[2], [1], [1], []], n_items=4)
    m = evaluate(Popularity().fit(train), train, test, k=1)
    # Popularity ranks 0 > 1 > 2 > 3; after filtering seen items: user0 → 2, user1 → 1, user2 → 1.
    assert m["precision"] == 1.0 and m["users"] == 3


def test_fold_in_split():
    full = sp.csr_matrix(np.ones((10, 6), dtype=np.float32))
    held, first, rest = fold_in_split(full, user_fraction=0.2, first_fraction=0.5, seed=0)
    assert len(held) == 2
    assert set(np.flatnonzero(np.diff(first.indptr)).tolist()) == set(held.tolist())
    for user in held:
        assert first[user].nnz == 3 and rest[user].nnz == 3
        assert not set(first[user].indices) & set(rest[user].indices)
