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


def test_content_candidates_find_neighbours_of_recent_plays():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=float)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    idx, _ = content_candidates(np.array([0]), emb, 2, exclude=np.array([0]))
    assert idx[0] == 1
