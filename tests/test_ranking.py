import pickle

import numpy as np
import pytest

from app.ranking.blend import Reasons, blend_ranked, blend_scores, rank_normalise
from app.ranking.recency import MS_PER_DAY, recency_boost
from app.ranking.rerank import mmr_rerank
from app.ranking.retrieval import content_candidates, top_k

NOW_MS = 1_780_000_000_000


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


def _plain_blend(sources, weights, release, now_ms, half_life, boost_weight, excluded, limit):
    """The blend as the numpy steps it compiles: weighted rank sum per item, best first (ties
    in order of first proposal), recency boost and re-sort, exclusions, limit."""
    totals, masks, order_seen, names = {}, {}, [], [s for s in sources if weights.get(s, 0) > 0 and len(sources[s][0])]
    for bit, name in enumerate(names):
        items, scores = sources[name]
        ranks = np.empty(len(scores))
        ranks[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
        for item, r in zip(items.tolist(), (1.0 - ranks / len(scores)).tolist()):
            if item not in totals:
                order_seen.append(item)
            totals[item] = totals.get(item, 0.0) + weights[name] * r
            masks[item] = masks.get(item, 0) | 1 << bit
    ranked = sorted(order_seen, key=lambda i: -totals[i])
    boost = {i: recency_boost(release[[i]], now_ms, half_life)[0] for i in ranked}
    score = {i: totals[i] + boost_weight * boost[i] for i in ranked}
    ranked = sorted(ranked, key=lambda i: -score[i]) if boost_weight > 0 else ranked
    kept = [i for i in ranked if not excluded[i]][:limit]
    flags = [masks[i] | (1 << len(names) if boost_weight > 0 and boost[i] >= 0.5 else 0) for i in kept]
    return kept, [score[i] for i in kept], flags, [*names, "recency_boost"]


def test_compiled_blend_ranks_what_the_plain_steps_rank():
    """Random sources (unsorted ones, duplicates, ties, unknown release dates, exclusions):
    the compiled blend must give the plain steps' items, scores and reasons."""
    rng = np.random.default_rng(11)
    for _ in range(300):
        n_items = int(rng.integers(1, 60))
        sources = {}
        for name in ("cf", "content", "trending", "new_releases", "popular"):
            size = int(rng.integers(0, 30))
            scores = rng.choice([0.1, 0.5, 0.9, 2.0], size) if rng.random() < 0.3 else rng.random(size)
            sources[name] = (rng.integers(0, n_items, size), np.sort(scores)[::-1] if rng.random() < 0.6 else scores)
        weights = {name: float(rng.choice([0.0, 0.5, 1.0, 2.0])) for name in sources}
        release = np.where(rng.random(n_items) < 0.1, np.nan, NOW_MS - rng.random(n_items) * 90 * MS_PER_DAY)
        excluded = rng.random(n_items) < 0.2
        boost_weight, limit = float(rng.choice([0.0, 0.3, 1.0])), int(rng.integers(1, 40))
        items, scores, reasons = blend_ranked(
            sources, weights, n_items, release_ms=release, now_ms=NOW_MS, half_life_days=30.0,
            recency_weight=boost_weight, excluded=excluded, limit=limit,
        )
        kept, plain_scores, flags, names = _plain_blend(sources, weights, release, NOW_MS, 30.0, boost_weight, excluded, limit)
        assert items.tolist() == kept
        np.testing.assert_allclose(scores, plain_scores, rtol=1e-12)
        assert reasons.masks.tolist() == flags and reasons.names == names


def test_compiled_blend_refuses_positions_outside_the_catalogue():
    """Compiled code does not check indices; the blend does, instead of writing past its arrays."""
    with pytest.raises(IndexError):
        blend_ranked({"cf": (np.array([0, 5]), np.array([1.0, 0.5]))}, {"cf": 1.0}, 3)
    with pytest.raises(ValueError):
        blend_ranked({"cf": (np.array([0, 2]), np.array([1.0, 0.5]))}, {"cf": 1.0}, 3, excluded=np.zeros(2, dtype=bool))


def test_content_candidates_find_neighbours_of_recent_plays():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=float)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    idx, _ = content_candidates(np.array([0]), emb, 2, exclude=np.array([0]))
    assert idx[0] == 1
