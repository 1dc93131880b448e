import pickle

import numpy as np

from app.ranking.blend import Reasons, blend_scores, rank_normalise
from app.ranking.rerank import mmr_rerank
from app.ranking.retrieval import content_candidates, top_k


def test_top_k_is_sorted_and_honours_exclusions():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    idx, vals = top_k(scores, 3, exclude=np.array([1]))
    assert idx.tolist() == [3, 2, 4]
    assert vals.tolist() == [0.7, 0.5, 0.3]
    assert len(top_k(scores, 10, exclude=np.arange(5))[0]) == 0


def test_rank_normalise_puts_sources_on_one_scale():
    np.testing.assert_allclose(rank_normalise(np.array([100.0, 3.0, 50.0])), [1.0, 1 / 3, 2 / 3])


def test_blend_credits_every_source_and_missing_source_contributes_nothing():
    items, scores, sources = blend_scores(
        {"cf": (np.array([1, 2]), np.array([5.0, 1.0])), "content": (np.array([2, 3]), np.array([0.9, 0.1]))},
        {"cf": 1.0, "content": 1.0},
    )
    assert items.tolist() == [2, 1, 3]  # 2 is liked by both sources
    assert sources[0] == ["cf", "content"] and sources[1] == ["cf"] and sources[2] == ["content"]
    assert scores[0] == 0.5 + 1.0


def test_reasons_follow_their_items_through_slicing_flags_and_the_wire():
    _, _, reasons = blend_scores(
        {"cf": (np.array([1, 2]), np.array([5.0, 1.0])), "trending": (np.array([2, 3]), np.array([3.0, 1.0]))},
        {"cf": 1.0, "trending": 1.0},
    )
    boosted = reasons[np.array([2, 0])].flag("recency_boost", np.array([True, False]))
    back = pickle.loads(pickle.dumps(boosted))
    assert list(back) == [["trending", "recency_boost"], ["cf", "trending"]]
    back[1].append("diversity_demoted")  # a caller's list is its own
    assert back[1] == ["cf", "trending"] and len(back[:1]) == 1
    assert list(Reasons.single("popular", 2)) == [["popular"], ["popular"]]


def test_blend_ignores_sources_without_weight():
    items, _, _ = blend_scores({"cf": (np.array([1]), np.array([1.0])), "x": (np.array([2]), np.array([1.0]))}, {"cf": 1})
    assert items.tolist() == [1]


def test_mmr_with_lambda_one_keeps_relevance_order():
    emb = np.eye(4)
    assert mmr_rerank(np.array([0.4, 0.9, 0.1, 0.5]), emb, 4, 1.0).tolist() == [1, 3, 0, 2]


def test_mmr_demotes_near_duplicates():
    # items 0 and 1 are the same song; 2 is different and slightly less relevant
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    order = mmr_rerank(np.array([1.0, 0.95, 0.9]), emb, 3, 0.5)
    assert order.tolist()[:2] == [0, 2]


def test_artist_cap_refills_from_next_candidates():
    artists = np.array(["a", "a", "a", "b", "c"])
    order = mmr_rerank(np.array([5, 4, 3, 2, 1.0]), np.eye(5), 4, 1.0, artists=artists, artist_cap=2)
    assert order.tolist() == [0, 1, 3, 4]  # third "a" skipped, list still 4 long


def _plain_mmr(rel, emb, k, lam, artists=None, artist_cap=None, genres=None, genre_cap=None):
    """MMR as defined: every pass scores every candidate still in play."""
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.ones(len(rel))
    picked, counts = [], {}
    caps = [(g, c) for g, c in ((artists, artist_cap), (genres, genre_cap)) if g is not None]
    while len(picked) < k:
        best, best_gain = None, -np.inf
        for i in range(len(rel)):
            if i in picked or any(counts.get((j, g[i]), 0) >= c for j, (g, c) in enumerate(caps)):
                continue
            penalty = max([float(emb[i] @ emb[p]) for p in picked] + [0.0])
            gain = lam * rel[i] - (1 - lam) * penalty
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            break
        picked.append(best)
        for j, (g, _) in enumerate(caps):
            counts[(j, g[best])] = counts.get((j, g[best]), 0) + 1
    return picked


def test_lazy_mmr_picks_what_plain_mmr_picks():
    """The re-ranker looks at only as many candidates as can still win (best-first input);
    integer groups include -1, the code pd.factorize gives an unknown artist or genre;
    its picks must be those of MMR evaluated in full, capped or not, sorted input or not."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        n, k, lam = int(rng.integers(1, 40)), int(rng.integers(1, 15)), float(rng.choice([0.0, 0.3, 0.8, 1.0]))
        rel = np.sort(rng.random(n))[::-1] if rng.random() < 0.7 else rng.random(n)
        emb = rng.normal(size=(n, 3))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        caps = {}
        if rng.random() < 0.6:
            caps.update(artists=rng.choice(np.array(["a", "b", "c", "d"]), n), artist_cap=int(rng.integers(1, 3)))
        if rng.random() < 0.5:
            caps.update(genres=rng.integers(-1, 3, n), genre_cap=int(rng.integers(1, 5)))
        assert mmr_rerank(rel, emb, k, lam, **caps).tolist() == _plain_mmr(rel, emb, k, lam, **caps)


def test_content_candidates_find_neighbours_of_recent_plays():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=float)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    idx, _ = content_candidates(np.array([0]), emb, 2, exclude=np.array([0]))
    assert idx[0] == 1
