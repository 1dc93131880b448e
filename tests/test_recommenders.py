"""Contract suite every recommender passes, plus ALS-specific checks and a quality comparison
against implicit's ALS. No Ray.

    .venv/bin/pytest tests/test_recommenders.py -q
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from app.config import CFSettings
from training.als import ImplicitALS, half_step, training_loss
from training.ease import EASE
from training.knn import ItemKNN, bm25_weight, keep_top_per_row
from training.nmf import NMFRecommender
from training.popularity import Popularity
from training.recommender import Recommender, UnknownUserError, top_k

GROUP = 6  # users and items per group


def checkerboard() -> sp.csr_matrix:
    """Two groups of 6 users, each liking its own group of 6 items and nothing else.

    User u has not seen two items of its own group (u % 6 and (u + 1) % 6), which is the known
    answer for a collaborative model. Group A's items are played twice as hard, so the known
    answer for popularity is group A's items whatever the user's group.
    """
    rows, cols, vals = [], [], []
    for user in range(2 * GROUP):
        group = user // GROUP
        missing = {user % GROUP, (user + 1) % GROUP}
        for offset in range(GROUP):
            if offset not in missing:
                rows.append(user)
                cols.append(group * GROUP + offset)
                vals.append(2.0 if group == 0 else 1.0)
    return sp.csr_matrix((vals, (rows, cols)), shape=(2 * GROUP, 2 * GROUP), dtype=np.float32)


def own_group_missing(user: int) -> set[int]:
    group = user // GROUP
    return {group * GROUP + user % GROUP, group * GROUP + (user + 1) % GROUP}


class RecommenderContract:
    """Shared tests; a subclass says how to build its model and what the known answers are."""

    def make_model(self) -> Recommender:
        raise NotImplementedError

    def expected_top2(self, user_items: sp.csr_matrix, user: int) -> set[int]:
        raise NotImplementedError

    def check_similar(self, item: int, ids: np.ndarray) -> None:
        raise NotImplementedError

    @pytest.fixture
    def user_items(self) -> sp.csr_matrix:
        return checkerboard()

    @pytest.fixture
    def model(self, user_items) -> Recommender:
        return self.make_model().fit(user_items)

    def test_known_answer(self, model, user_items):
        for user in range(user_items.shape[0]):
            ids, _ = model.recommend(user, user_items, k=2)
            assert set(ids.tolist()) == self.expected_top2(user_items, user), f"user {user}"

    def test_scores_best_first(self, model, user_items):
        _, scores = model.recommend(0, user_items, k=8)
        assert np.all(np.diff(scores) <= 0)

    def test_filter_seen(self, model, user_items):
        n_items = user_items.shape[1]
        for user in range(user_items.shape[0]):
            seen = set(user_items[user].indices.tolist())
            ids, _ = model.recommend(user, user_items, k=n_items, filter_seen=True)
            assert not seen & set(ids.tolist())
            assert len(ids) == n_items - len(seen)
            ids, _ = model.recommend(user, user_items, k=n_items, filter_seen=False)
            assert sorted(ids.tolist()) == list(range(n_items))

    def test_zero_weight_counts_as_unseen(self, model, user_items):
        """An explicit 0 (e.g. a skip weighted 0) is no interaction, as in fit."""
        coo = user_items.tocoo()
        with_zero = sp.csr_matrix(
            (np.append(coo.data, 0.0), (np.append(coo.row, 0), np.append(coo.col, 11))), shape=user_items.shape
        )
        assert with_zero.nnz == user_items.nnz + 1  # the zero is stored
        ids, _ = model.recommend(0, with_zero, k=12)
        assert 11 in ids

    @pytest.mark.parametrize("filter_seen", [True, False])
    def test_batch_agrees_with_single(self, model, user_items, filter_seen):
        users = np.arange(user_items.shape[0])[::-1]
        batch_ids, batch_scores = model.recommend_batch(users, user_items, k=5, filter_seen=filter_seen)
        assert batch_ids.shape == batch_scores.shape == (len(users), 5)
        for row, user in enumerate(users):
            ids, scores = model.recommend(int(user), user_items, k=5, filter_seen=filter_seen)
            np.testing.assert_array_equal(batch_ids[row], ids)
            np.testing.assert_allclose(batch_scores[row], scores, rtol=1e-5)

    def test_batch_pads_when_too_few_items(self, model, user_items):
        ids, scores = model.recommend_batch(np.array([0, 7]), user_items, k=50)
        assert ids.shape == (2, user_items.shape[1])
        for row, user in enumerate([0, 7]):
            n_seen = user_items[user].nnz
            assert np.all(ids[row, -n_seen:] == -1) and np.all(np.isneginf(scores[row, -n_seen:]))
            assert np.all(ids[row, :-n_seen] >= 0)

    def test_candidates_restrict_ranking(self, model, user_items):
        full, _ = model.recommend(3, user_items, k=12)
        candidates = np.array([11, 4, 7, 0, 2])  # 0 and 4 are seen by user 3
        ids, _ = model.recommend(3, user_items, k=12, candidates=candidates)
        assert ids.tolist() == [i for i in full.tolist() if i in set(candidates.tolist())]

    def test_similar_items(self, model):
        ids, scores = model.similar_items(0, k=5)
        assert len(ids) == 5 and 0 not in ids
        assert np.all(np.diff(scores) <= 0)
        self.check_similar(0, ids)

    def test_deterministic(self, user_items):
        a = self.make_model().fit(user_items)
        b = self.make_model().fit(user_items)
        users = np.arange(user_items.shape[0])
        np.testing.assert_array_equal(a.recommend_batch(users, user_items)[0], b.recommend_batch(users, user_items)[0])
        np.testing.assert_array_equal(a.recommend_batch(users, user_items)[1], b.recommend_batch(users, user_items)[1])

    def test_inputs_not_mutated(self, model, user_items):
        before = user_items.copy()
        model.recommend(0, user_items, k=3)
        model.recommend_batch(np.arange(4), user_items, k=3)
        model.similar_items(0, k=3)
        assert (before != user_items).nnz == 0
        again, _ = model.similar_items(0, k=3)
        assert 0 not in again

    @pytest.mark.parametrize(
        "call, message",
        [
            (lambda m, r: m.recommend(0, r, k=0), "k must be >= 1"),
            (lambda m, r: m.recommend(-1, r), "out of range"),
            (lambda m, r: m.recommend(12, r), "out of range"),
            (lambda m, r: m.recommend(0, r[:, :5]), "shape"),
            (lambda m, r: m.recommend(0, r.toarray()), "scipy.sparse"),
            (lambda m, r: m.recommend(0, -r), "negative"),
            (lambda m, r: m.recommend(0, r, candidates=np.array([3, 99])), "out of range"),
            (lambda m, r: m.recommend_batch(np.array([0, 12]), r), "out of range"),
            (lambda m, r: m.recommend_batch(np.array([0]), r, k=0), "k must be >= 1"),
            (lambda m, r: m.recommend_batch(np.array([0]), sp.vstack([r, r])), "shape"),
            (lambda m, r: m.similar_items(12), "out of range"),
            (lambda m, r: m.similar_items(0, k=-2), "k must be >= 1"),
        ],
    )
    def test_bad_input_raises(self, model, user_items, call, message):
        with pytest.raises(ValueError, match=message):
            call(model, user_items)

    def test_fit_rejects_bad_matrix(self, user_items):
        with pytest.raises(ValueError, match="negative"):
            self.make_model().fit(-user_items)
        with pytest.raises(ValueError, match="scipy.sparse"):
            self.make_model().fit(user_items.toarray())
        nan = user_items.copy()
        nan.data[0] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            self.make_model().fit(nan)

    def test_unknown_user_is_its_own_error(self, model, user_items):
        """Serving catches UnknownUserError to take the cold-start path."""
        with pytest.raises(UnknownUserError):
            model.recommend(user_items.shape[0], user_items)
        with pytest.raises(UnknownUserError):
            model.recommend_batch(np.array([0, user_items.shape[0] + 3]), user_items)

    def test_fold_in_known_answer(self, model, user_items):
        """A listener known only by their plays gets the same known answer as a fitted user."""
        for user in range(user_items.shape[0]):
            row = user_items[user]
            ids, scores = model.recommend_fold_in(row.indices, row.data, k=2)
            assert set(ids.tolist()) == self.expected_top2(user_items, user), f"user {user}"
            assert np.all(np.diff(scores) <= 0)

    def test_fold_in_candidates_and_filter(self, model, user_items):
        row = user_items[3]
        ids, _ = model.recommend_fold_in(row.indices, k=12, filter_seen=False)
        assert sorted(ids.tolist()) == list(range(12))
        ids, _ = model.recommend_fold_in(row.indices, k=12, candidates=np.array([11, 0, 7]))
        assert sorted(ids.tolist()) == [7, 11]  # user 3 played item 0

    def test_fold_in_repeats_add_up(self, model):
        np.testing.assert_allclose(model.fold_in([1, 1, 2]), model.fold_in([1, 2], [2.0, 1.0]), rtol=1e-5)

    @pytest.mark.parametrize(
        "args, message",
        [(([0, 12],), "out of range"), (([0, 1], [1.0, -1.0]), "negative"), (([0, 1], [1.0]), "shape"),
         ((["a", "b"],), "integer ids"), (([[0, 1]],), "1-D")],
    )
    def test_fold_in_bad_input(self, model, args, message):
        with pytest.raises(ValueError, match=message):
            model.fold_in(*args)
        with pytest.raises(ValueError, match=message):
            model.recommend_fold_in(*args)

    def test_not_fitted_raises(self, user_items):
        model = self.make_model()
        with pytest.raises(ValueError, match="not fitted"):
            model.recommend(0, user_items)
        with pytest.raises(ValueError, match="not fitted"):
            model.recommend_batch(np.array([0]), user_items)
        with pytest.raises(ValueError, match="not fitted"):
            model.similar_items(0)
        with pytest.raises(ValueError, match="not fitted"):
            model.fold_in([0])


class TestImplicitALS(RecommenderContract):
    def make_model(self) -> ImplicitALS:
        return ImplicitALS(factors=4, regularization=0.1, alpha=10.0, iterations=10, cg_steps=3, seed=3)

    def expected_top2(self, user_items, user):
        return own_group_missing(user)

    def check_similar(self, item, ids):
        assert set(ids.tolist()) == set(range(GROUP)) - {item}

    def test_factors_shape_dtype(self, model, user_items):
        assert model.user_factors.shape == (12, 4) and model.user_factors.dtype == np.float32
        assert model.item_factors.shape == (12, 4) and model.item_factors.dtype == np.float32

    def test_seed_changes_start(self, user_items):
        a = ImplicitALS(factors=4, iterations=2, seed=0).fit(user_items)
        b = ImplicitALS(factors=4, iterations=2, seed=1).fit(user_items)
        assert not np.allclose(a.item_factors, b.item_factors)

    def test_from_settings(self):
        settings = CFSettings(factors=7, regularization=2.0, alpha=3.0, iterations=4, cg_steps=2, seed=9)
        model = ImplicitALS.from_settings(settings)
        assert (model.factors, model.regularization, model.alpha, model.iterations, model.cg_steps, model.seed) == (
            7, 2.0, 3.0, 4, 2, 9,
        )

    def test_block_size_does_not_change_result(self, user_items):
        small = ImplicitALS(factors=4, regularization=0.1, iterations=5, seed=3, block_size=5).fit(user_items)
        whole = ImplicitALS(factors=4, regularization=0.1, iterations=5, seed=3, block_size=1000).fit(user_items)
        np.testing.assert_allclose(small.user_factors, whole.user_factors, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(small.item_factors, whole.item_factors, rtol=1e-4, atol=1e-6)

    def test_half_step_matches_exact_solve_and_is_pure(self):
        """Enough CG steps reach the closed-form least-squares solution for every row."""
        rng = np.random.default_rng(0)
        R = sp.random(30, 40, density=0.2, random_state=1, format="csr", dtype=np.float32)
        R.data = np.round(R.data * 5)  # counts, some of them explicit zeros
        Y = rng.standard_normal((40, 5)).astype(np.float32) * 0.3
        X = rng.standard_normal((30, 5)).astype(np.float32) * 0.01
        X_before, Y_before = X.copy(), Y.copy()
        new = half_step(R, X, Y, regularization=0.5, alpha=4.0, cg_steps=25, block_size=7)
        np.testing.assert_array_equal(X, X_before)
        np.testing.assert_array_equal(Y, Y_before)
        for u in range(30):
            row = R[u].toarray().ravel().astype(np.float64)
            c = 1 + 4.0 * row
            A = (Y.T * c) @ Y + 0.5 * np.eye(5)
            b = Y.T @ (c * (row > 0))
            np.testing.assert_allclose(new[u], np.linalg.solve(A, b), rtol=1e-3, atol=1e-4)

    def test_thread_count_does_not_change_result(self, user_items):
        one = ImplicitALS(factors=4, regularization=0.1, iterations=5, seed=3, num_threads=1).fit(user_items)
        two = ImplicitALS(factors=4, regularization=0.1, iterations=5, seed=3, num_threads=2).fit(user_items)
        np.testing.assert_array_equal(one.user_factors, two.user_factors)
        np.testing.assert_array_equal(one.item_factors, two.item_factors)

    def test_half_step_is_implicits_cg_step(self):
        """Same CG steps from the same start as implicit's solver: the same factors.

        implicit's confidence is its input as given, so it gets 1 + alpha * R.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # implicit's BLAS-threads advice
            _als = pytest.importorskip("implicit.cpu._als")
        rng = np.random.default_rng(2)
        R = sp.random(50, 40, density=0.15, random_state=2, format="csr", dtype=np.float32)
        R.data = np.ceil(R.data * 4)
        Y = rng.standard_normal((40, 6)).astype(np.float32) * 0.3
        X = rng.standard_normal((50, 6)).astype(np.float32) * 0.1
        confidence = R.copy()
        confidence.data = 1 + 3.0 * confidence.data
        expected = X.copy()
        _als.least_squares_cg(confidence, expected, Y, 0.5, 1, 3)
        ours = half_step(R, X, Y, regularization=0.5, alpha=3.0, cg_steps=3)
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)

    def test_half_steps_reduce_loss(self, user_items):
        model = ImplicitALS(factors=4, regularization=0.1, alpha=10.0, seed=0)
        X, Y = model.init_factors(*user_items.shape)
        losses = [training_loss(user_items, X, Y, 0.1, 10.0)]
        item_users = user_items.T.tocsr()
        for _ in range(4):
            X = half_step(user_items, X, Y, 0.1, 10.0, 3, block_size=4)
            Y = half_step(item_users, Y, X, 0.1, 10.0, 3, block_size=4)
            losses.append(training_loss(user_items, X, Y, 0.1, 10.0))
        assert all(later < earlier for earlier, later in zip(losses, losses[1:]))

    def test_fold_in_reproduces_fitted_users(self, model, user_items):
        for user in range(user_items.shape[0]):
            row = user_items[user]
            vector = model.fold_in(row.indices, row.data)
            fitted = model.user_factors[user]
            cosine = vector @ fitted / (np.linalg.norm(vector) * np.linalg.norm(fitted))
            assert cosine > 0.95, f"user {user}: cosine {cosine:.3f}"
            scores = model.item_factors @ vector
            scores[row.indices] = -np.inf
            assert set(np.argsort(-scores)[:2].tolist()) == own_group_missing(user)

    def test_from_factors(self, model, user_items):
        clone = ImplicitALS.from_factors(model.user_factors, model.item_factors, regularization=0.1, alpha=10.0)
        np.testing.assert_array_equal(clone.recommend(2, user_items)[0], model.recommend(2, user_items)[0])
        np.testing.assert_allclose(clone.fold_in([0, 1]), model.fold_in([0, 1]), rtol=1e-6)
        with pytest.raises(ValueError, match="disagree"):
            ImplicitALS.from_factors(model.user_factors, model.item_factors[:, :2])

    @pytest.mark.parametrize(
        "params",
        [{"factors": 0}, {"iterations": 0}, {"cg_steps": 0}, {"alpha": 0.0}, {"regularization": -1.0},
         {"num_threads": -1}],
    )
    def test_bad_hyperparameters(self, params):
        with pytest.raises(ValueError, match=next(iter(params))):
            ImplicitALS(**params)


class TestPopularity(RecommenderContract):
    def make_model(self) -> Popularity:
        return Popularity()

    def expected_top2(self, user_items, user):
        totals = np.asarray(user_items.sum(axis=0)).ravel()
        totals[user_items[user].indices] = -np.inf
        return set(sorted(range(len(totals)), key=lambda i: (-totals[i], i))[:2])

    def check_similar(self, item, ids):
        assert set(ids.tolist()) <= set(range(GROUP))  # group A is the popular one

    def test_known_answer_ignores_group(self, model, user_items):
        ids, _ = model.recommend(7, user_items, k=2)  # a group-B user still gets group A
        assert set(ids.tolist()) <= set(range(GROUP))


class TestItemKNN(RecommenderContract):
    def make_model(self) -> ItemKNN:
        return ItemKNN(neighbors=20)

    def expected_top2(self, user_items, user):
        return own_group_missing(user)

    def check_similar(self, item, ids):
        assert set(ids.tolist()) == set(range(GROUP)) - {item}

    def test_neighbors_prune_similarities(self, user_items):
        model = ItemKNN(neighbors=2).fit(user_items)
        assert np.all(np.diff(model.similarity.indptr) <= 2)

    def test_bm25_keeps_known_answer(self, user_items):
        model = ItemKNN(neighbors=20, bm25=True).fit(user_items)
        for user in range(user_items.shape[0]):
            assert set(model.recommend(user, user_items, k=2)[0].tolist()) == own_group_missing(user)

    def test_new_history_counts_without_refit(self, model, user_items):
        """Item-based scoring reads the history passed in, so a fresh play moves the ranking."""
        newer = user_items.tolil()
        newer[0, 7] = 5.0  # user 0 (group A) now plays a group-B item
        ids, _ = model.recommend(0, newer.tocsr(), k=8)
        assert set(ids.tolist()) & set(range(GROUP, 2 * GROUP))

    def test_helpers(self):
        matrix = sp.csr_matrix(np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0]]))
        assert keep_top_per_row(matrix, 1).toarray().tolist() == [[3.0, 0, 0], [0, 5.0, 0]]  # tie: smaller column
        weighted = bm25_weight(sp.csr_matrix(np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])))
        assert weighted[0, 1] > weighted[0, 0]  # the item everyone plays weighs least

    def test_bad_hyperparameters(self):
        with pytest.raises(ValueError, match="neighbors"):
            ItemKNN(neighbors=0)


class TestEASE(RecommenderContract):
    def make_model(self) -> EASE:
        return EASE(regularization=1.0)

    def expected_top2(self, user_items, user):
        return own_group_missing(user)

    def check_similar(self, item, ids):
        # EASE weights are negative between items that stand in for each other in the
        # checkerboard's cycle, so only the strongest neighbours are known to be in-group.
        assert set(ids[:3].tolist()) <= set(range(GROUP)) - {item}

    def test_closed_form(self, user_items):
        """B solves min ||X − XB||² + λ||B||² with diag(B) = 0: the KKT stationarity holds."""
        model = EASE(regularization=2.0).fit(user_items)
        X = (user_items.toarray() > 0).astype(np.float64)
        B = model.weights.astype(np.float64)
        gradient = X.T @ (X @ B - X) + 2.0 * B
        off_diagonal = ~np.eye(12, dtype=bool)
        np.testing.assert_allclose(gradient[off_diagonal], 0, atol=1e-4)
        assert np.all(np.diag(B) == 0)

    def test_refuses_huge_catalog(self, user_items):
        with pytest.raises(ValueError, match="max_items"):
            EASE(max_items=5).fit(user_items)


class TestNMF(RecommenderContract):
    def make_model(self) -> NMFRecommender:
        return NMFRecommender(factors=2, max_iter=500, seed=0)

    def expected_top2(self, user_items, user):
        return own_group_missing(user)

    def check_similar(self, item, ids):
        assert set(ids.tolist()) == set(range(GROUP)) - {item}

    def test_factors_non_negative(self, model):
        assert model.user_factors.min() >= 0 and model.item_factors.min() >= 0

    @pytest.mark.parametrize("params", [{"factors": 0}, {"max_iter": 0}, {"regularization": -1.0}, {"l1_ratio": 2.0}])
    def test_bad_hyperparameters(self, params):
        with pytest.raises(ValueError, match=next(iter(params))):
            NMFRecommender(**params)


def test_top_k_breaks_a_tie_at_the_kth_place_by_the_smaller_id():
    """Five items score 1 and four tie at 0 for the last two places: the smaller ids get them,
    as every model promises, so a ranking never depends on argpartition's internals."""
    scores = np.array([[1, 0, 0, 1, 1, 0, 0, 1, 1]], dtype=np.float32)
    ids, best = top_k(scores, 7)
    assert ids.tolist() == [[0, 3, 4, 7, 8, 1, 2]] and best.tolist() == [[1, 1, 1, 1, 1, 0, 0]]
    # a scored candidate subset: the smaller item ids, whatever their columns
    ids, _ = top_k(scores, 7, item_ids=np.array([90, 80, 70, 60, 50, 40, 30, 20, 10]))
    assert ids.tolist() == [[10, 20, 50, 60, 90, 30, 40]]
    # in a batch, a row short of eligible items is still padded to k with -1 / -inf
    batch = np.vstack([scores, [[0, -np.inf, 0, -np.inf, 0, 0, -np.inf, -np.inf, -np.inf]]]).astype(np.float32)
    ids, best = top_k(batch, 7)
    assert ids.tolist() == [[0, 3, 4, 7, 8, 1, 2], [0, 2, 4, 5, -1, -1, -1]]
    assert np.isneginf(best[1, 4:]).all()


# --- quality against implicit ----------------------------------------------------------


def low_rank_interactions(n_users=300, n_items=200, rank=4, per_user=20, seed=0):
    """Users pick items by a softmax over a rank-4 affinity (Gumbel top-k); 20% held out."""
    rng = np.random.default_rng(seed)
    affinity = 1.5 * rng.standard_normal((n_users, rank)) @ rng.standard_normal((rank, n_items))
    picks = np.argsort(affinity + rng.gumbel(size=affinity.shape), axis=1)[:, -per_user:]
    rows = np.repeat(np.arange(n_users), per_user)
    cols = picks.ravel()
    counts = (rng.poisson(2, size=len(rows)) + 1).astype(np.float32)
    held_out = rng.random(len(rows)) < 0.2
    train = sp.csr_matrix((counts[~held_out], (rows[~held_out], cols[~held_out])), shape=(n_users, n_items))
    test = sp.csr_matrix((np.ones(held_out.sum()), (rows[held_out], cols[held_out])), shape=(n_users, n_items))
    return train, test


def precision_at_k(ids: np.ndarray, test: sp.csr_matrix, k: int = 10) -> float:
    hits = evaluated = 0
    for user in range(test.shape[0]):
        truth = set(test[user].indices.tolist())
        if truth:
            hits += len(truth & set(ids[user, :k].tolist()))
            evaluated += k
    return hits / evaluated


def test_quality_comparable_to_implicit(record_property):
    """Same objective, same hyperparameters: held-out P@10 within a few points of implicit's.

    implicit's confidence is its input scaled by alpha (no +1), so it gets 1 + alpha * R with
    alpha=1: both libraries then minimise exactly the same loss.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # implicit's BLAS-threads advice
        implicit_als = pytest.importorskip("implicit.cpu.als")
        from implicit.cpu import _als

    hp = dict(factors=8, regularization=5.0, iterations=15)
    alpha = 10.0
    train, test = low_rank_interactions()
    users = np.arange(train.shape[0])

    ours = ImplicitALS(**hp, alpha=alpha, cg_steps=3, seed=0).fit(train)
    ours_ids, _ = ours.recommend_batch(users, train, k=10)

    confidence = train.copy()
    confidence.data = 1 + alpha * confidence.data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # implicit's BLAS-threads advice
        reference = implicit_als.AlternatingLeastSquares(**hp, alpha=1.0, random_state=0, num_threads=1)
        reference.fit(confidence, show_progress=False)
    ref_ids, _ = reference.recommend(users, train, N=10, filter_already_liked_items=True)

    popular_ids, _ = Popularity().fit(train).recommend_batch(users, train, k=10)
    p_ours, p_ref, p_pop = (precision_at_k(ids, test) for ids in (ours_ids, ref_ids, popular_ids))
    loss_ours = training_loss(train, ours.user_factors, ours.item_factors, hp["regularization"], alpha)
    loss_ref = training_loss(train, reference.user_factors, reference.item_factors, hp["regularization"], alpha)
    for name, value in [("p10_ours", p_ours), ("p10_implicit", p_ref), ("p10_popularity", p_pop),
                        ("loss_ours", loss_ours), ("loss_implicit", loss_ref)]:
        record_property(name, round(value, 5))

    # Our loss is implicit's loss (same normalisation), checked on the same factors.
    implicit_loss = _als.calculate_loss(confidence, ours.user_factors, ours.item_factors, hp["regularization"])
    assert loss_ours == pytest.approx(implicit_loss, rel=1e-4)
    assert p_ours >= p_ref - 0.03, (p_ours, p_ref)
    assert p_ours > 1.5 * p_pop, (p_ours, p_pop)
    assert loss_ours <= 1.05 * loss_ref, (loss_ours, loss_ref)
