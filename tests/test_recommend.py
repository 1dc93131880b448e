"""Known-answer tests of the serving steps as pure functions, on a hand-made catalogue."""

import pickle
from dataclasses import MISSING, fields

import numpy as np
import pytest

from app.config import ServingSettings
from app.models import ModelBundle
from app.prefs import UserPrefs, prefs_from_hash
from app.ranking.blend import Reasons
from app.ranking.filters import allowed
from app.ranking.recency import MS_PER_DAY, recency_boost
from app.ranking.rerank import mmr_rerank
from app.ranking.segments import user_segment
from app.recommend import (
    Blended, Retrieved, UserFeatures, blend_candidates, new_releases, placed_in, popular_fallback, rerank_candidates, retrieve_cf,
    retrieve_content,
)

NOW = 1_800_000_000_000


def bundle(n=8) -> ModelBundle:
    """Tracks t0..t7: artists a0 (t0-t3), a1 (t4-t5), a2 (t6-t7); genres rock x6, jazz x2;
    CF factors put t0..t3 on axis 0 and t4..t7 on axis 1; t7 is explicit; t6 released today."""
    ids = np.array([f"t{i}" for i in range(n)], dtype=object)
    emb = np.eye(n, dtype=np.float32)
    factors = np.zeros((n, 2), dtype=np.float32)
    factors[:4, 0] = np.linspace(1.0, 0.7, 4)
    factors[4:, 1] = np.linspace(1.0, 0.7, 4)
    release = np.full(n, NOW - 400 * MS_PER_DAY, dtype=float)
    release[6] = NOW
    return ModelBundle(
        track_ids=ids,
        artists=np.array(["a0"] * 4 + ["a1"] * 2 + ["a2"] * 2, dtype=object),
        genres=np.array(["rock"] * 6 + ["jazz"] * 2, dtype=object),
        embeddings=emb,
        item_factors=factors,
        versions={"cf": "v1", "content": "v1"},
        release_ms=release,
        explicit=np.array([False] * 7 + [True]),
    )


def settings(**over) -> ServingSettings:
    # one weight set for every segment unless a test says otherwise
    base = dict(recency_weight=0.0, new_release_days=1.0, mmr_lambda=1.0, artist_cap=10, genre_max_share=1.0, segment_weights={})
    return ServingSettings(**{**base, **over})


def test_recency_boost_halves_every_half_life():
    release = np.array([NOW, NOW - 30 * MS_PER_DAY, NOW - 60 * MS_PER_DAY, np.nan, NOW + MS_PER_DAY])
    np.testing.assert_allclose(recency_boost(release, NOW, 30.0), [1.0, 0.5, 0.25, 0.0, 1.0])


def test_segments():
    assert [user_segment(n, 5, 100) for n in (None, 4, 5, 99, 100)] == ["new", "new", "casual", "casual", "heavy"]


def test_segment_weights_change_the_blend():
    s = ServingSettings()
    assert s.weights_for("new")["content"] > s.weights_for("heavy")["content"]
    assert s.weights_for("casual") == s.source_weights


def test_unknown_source_name_is_a_config_error():
    with pytest.raises(ValueError, match="unknown candidate source"):
        ServingSettings(fallback_chain=["cf", "collaborative"])


def test_filters_drop_heard_blocked_and_explicit():
    ids = np.array(["t0", "t1", "t2", "t3"], dtype=object)
    artists = np.array(["a", "a", "b", "c"], dtype=object)
    explicit = np.array([False, False, False, True])
    heard = {"t0": NOW - 2 * MS_PER_DAY, "t1": NOW - 40 * MS_PER_DAY}
    mask = allowed(ids, artists, explicit, heard_at_ms=heard, now_ms=NOW, heard_within_days=30, allow_explicit=False)
    assert mask.tolist() == [False, True, True, False]  # t0 heard 2 days ago; t1 heard long ago is fine
    mask = allowed(ids, artists, explicit, blocked_tracks={"t2"}, blocked_artists={"a"})
    assert mask.tolist() == [False, False, False, True]


def test_genre_cap_balances_without_shortening():
    genres = np.array(["rock"] * 4 + ["jazz"] * 2, dtype=object)
    order = mmr_rerank(np.arange(6, 0, -1.0), np.eye(6), 4, 1.0, genres=genres, genre_cap=2)
    assert order.tolist() == [0, 1, 4, 5]


def test_cf_retrieval_is_one_product_for_a_batch_and_excludes_heard():
    b = bundle()
    a = UserFeatures("u1", True, cf_vector=np.array([1.0, 0.0]), heard_recently=["t0"])
    c = UserFeatures("u2", True, cf_vector=np.array([0.0, 1.0]))
    d = UserFeatures("u3", False)
    ra, rc, rd = retrieve_cf([(a, a.cf_vector), (c, c.cf_vector), (d, None)], b, 3)
    assert list(ra.track_ids) == ["t1", "t2", "t3"] and list(rc.track_ids) == ["t4", "t5", "t6"] and list(rd.track_ids) == []


def test_each_request_of_a_batch_retrieves_its_own_number_of_candidates():
    """An experiment variant may change `candidates` for its users only."""
    b = bundle()
    f = UserFeatures("u", True, cf_vector=np.ones(2), recent_tracks=["t0"])
    assert [len(r.track_ids) for r in retrieve_cf([(f, f.cf_vector), (f, f.cf_vector)], b, [1, 3])] == [1, 3]
    assert [len(r.track_ids) for r in retrieve_content([f, f], b, [2, 4])] == [2, 4]


def test_content_retrieval_finds_neighbours_of_recent_plays():
    b = bundle()
    b.embeddings[1] = b.embeddings[0] * 0.8 + b.embeddings[1] * 0.2
    b.embeddings /= np.linalg.norm(b.embeddings, axis=1, keepdims=True)
    (r,) = retrieve_content([UserFeatures("u", True, recent_tracks=["t0"], heard_recently=["t0"])], b, 1)
    assert list(r.track_ids) == ["t1"]


def test_new_releases_are_the_window_newest_first():
    """Released within `days` of now (a future date counts, an unknown one does not), newest
    first, ties in catalogue order, at most n."""
    days = [np.nan, 10, 29, 31, 29, 45, 9]
    b = ModelBundle(
        track_ids=[f"t{i}" for i in range(7)], artists=["a"] * 7, genres=["g"] * 7, embeddings=np.eye(7),
        item_factors=None, versions={"content": "v1"}, release_ms=np.asarray(days) * MS_PER_DAY,
    )
    def newest(within: float, n: int) -> list[str]:  # the catalogue as of day 40
        return new_releases(b, 40 * MS_PER_DAY, within, n).track_ids.tolist()

    thirty_up_to_ten, thirty_up_to_three, five_up_to_ten = newest(30.0, 10), newest(30.0, 3), newest(5.0, 10)
    assert thirty_up_to_ten == ["t5", "t3", "t2", "t4", "t1"]
    assert thirty_up_to_three == ["t5", "t3", "t2"]
    assert five_up_to_ten == ["t5"]


def test_blend_rank_normalises_and_credits_sources():
    b = bundle()
    f = UserFeatures("u", True, cf_vector=np.ones(2), n_plays=50)
    cf = Retrieved(["t1", "t2"], np.array([9.0, 1.0]))
    content = Retrieved(["t2", "t3"], np.array([0.9, 0.1]))
    out = blend_candidates(f, b, settings(source_weights={"cf": 1.0, "content": 1.0}), cf=cf, content=content, now_ms=NOW)
    assert list(out.track_ids[:3]) == ["t2", "t1", "t3"]  # t2 is liked by both sources
    assert out.reasons[0] == ["cf", "content"] and out.segment == "casual" and not out.cold_start


def test_recency_boost_lifts_a_new_release_and_says_so():
    b = bundle()
    f = UserFeatures("u", True, cf_vector=np.ones(2), n_plays=50)
    cf = Retrieved(["t5", "t6"], np.array([2.0, 1.0]))
    flat = blend_candidates(f, b, settings(source_weights={"cf": 1.0}, new_release_days=0.001), cf=cf, now_ms=NOW)
    boosted = blend_candidates(f, b, settings(source_weights={"cf": 1.0}, recency_weight=1.0, new_release_days=0.001), cf=cf, now_ms=NOW)
    assert list(flat.track_ids[:2]) == ["t5", "t6"]
    assert boosted.track_ids[0] == "t6" and "recency_boost" in boosted.reasons[0]


def test_blend_filters_blocked_explicit_and_heard():
    b = bundle()
    prefs = UserPrefs(allow_explicit=False, blocked_tracks={"t4"}, blocked_artists={"a0"})
    f = UserFeatures("u", True, cf_vector=np.ones(2), heard_recently=["t5"], online_recent=["t6"], prefs=prefs)
    cf = Retrieved([f"t{i}" for i in range(8)], np.arange(8, 0, -1.0))
    out = blend_candidates(f, b, settings(source_weights={"cf": 1.0}), cf=cf, now_ms=NOW)
    assert list(out.track_ids) == []  # a0's tracks blocked, t4 hidden, t5 and t6 heard, t7 explicit


@pytest.mark.parametrize(
    "prefs, expected",
    [
        (UserPrefs(blocked_artists={"a0"}), ["t4", "t5", "t6", "t7"]),  # explicit t7 allowed
        (UserPrefs(allow_explicit=False), ["t0", "t1", "t2", "t3", "t4", "t5", "t6"]),  # a0 allowed
        (UserPrefs(), [f"t{i}" for i in range(8)]),
    ],
)
def test_blend_applies_each_preference_on_its_own(prefs, expected):
    f = UserFeatures("u", True, cf_vector=np.ones(2), prefs=prefs)
    cf = Retrieved([f"t{i}" for i in range(8)], np.arange(8, 0, -1.0))
    out = blend_candidates(f, bundle(), settings(source_weights={"cf": 1.0}), cf=cf, now_ms=NOW)
    assert list(out.track_ids) == expected


def test_cold_start_uses_only_history_free_sources():
    b = bundle()
    f = UserFeatures("stranger", False, trending=[("t3", 5.0)], popular=[("t0", 9.0), ("t1", 8.0)])
    out = blend_candidates(f, b, ServingSettings(new_release_days=1.0), now_ms=NOW)
    assert out.cold_start and out.segment == "new"
    assert set(out.track_ids) == {"t0", "t1", "t3", "t6"}
    assert {s for r in out.reasons for s in r} <= {"popular", "trending", "new_releases", "recency_boost"}


def test_replica_popular_list_stands_in_when_the_store_gave_none():
    b = bundle()
    b.popular = [("t2", 3.0)]
    out = blend_candidates(UserFeatures("u", False, stale=True), b, settings(source_weights={"popular": 1.0}), now_ms=NOW)
    assert out.track_ids == ["t2"] and out.degraded


def test_popular_fallback_keeps_the_listeners_filters():
    """When the blend fails the replica's popular list answers, still without what the listener
    blocked (track or artist), just heard, or opted out of (explicit)."""
    b = bundle()
    b.popular = [(f"t{i}", 10.0 - i) for i in range(8)] + [("gone", 1.0)]
    b.versions = {**b.versions, "trending": "v7"}
    f = UserFeatures(
        "u", True, cf_vector=np.ones(2), online_recent=["t2"], n_plays=50,
        prefs=UserPrefs(allow_explicit=False, blocked_tracks={"t1"}, blocked_artists={"a1"}),
    )
    out = popular_fallback(f, b, settings())
    assert list(out.track_ids) == ["t0", "t3", "t6"]
    assert out.degraded and not out.cold_start and out.segment == "casual" and out.versions == {"trending": "v7"}
    assert [i.track_id for i in rerank_candidates(out, b, 2, settings())] == ["t0", "t3"]
    stranger = popular_fallback(UserFeatures("new", False), b, settings())
    assert stranger.cold_start and list(stranger.track_ids) == [f"t{i}" for i in range(8)]


def test_rerank_caps_artists_and_fills_from_the_chain_when_short():
    b = bundle()
    f = UserFeatures("u", True, cf_vector=np.ones(2))
    cf = Retrieved(["t0", "t1", "t2", "t3"], np.array([4.0, 3.0, 2.0, 1.0]))
    blended = blend_candidates(f, b, settings(source_weights={"cf": 1.0}), cf=cf, now_ms=NOW)
    capped = rerank_candidates(blended, b, 3, settings(artist_cap=2, fallback_chain=["cf"]))
    # only artist a0 is available: two within the cap, then the chain fills the third
    assert [i.track_id for i in capped] == ["t0", "t1", "t2"]


def test_tracks_without_artist_or_genre_are_answered_with_nulls():
    """A catalogue may lack a track's artist or genre (NaN from Parquet) or number its artists:
    the answer then says null, or the number as text, instead of failing the batch's answers."""
    b = bundle()
    b.artists = np.array([np.nan, None, 7, 7, "a1", "a1", "a2", "a2"], dtype=object)
    b.genres = np.array([np.nan, "rock", None, "rock", "rock", "rock", "jazz", "jazz"], dtype=object)
    b.__post_init__()
    f = UserFeatures("u", True, cf_vector=np.ones(2))
    cf = Retrieved(["t0", "t1", "t2", "t3"], np.array([4.0, 3.0, 2.0, 1.0]))
    blended = blend_candidates(f, b, settings(source_weights={"cf": 1.0}), cf=cf, now_ms=NOW)
    items = rerank_candidates(blended, b, 4, settings())
    assert [(i.track_id, i.artist_id, i.genre) for i in items] == [
        ("t0", None, None), ("t1", None, "rock"), ("t2", "7", None), ("t3", "7", "rock"),
    ]


def test_rerank_marks_diversity_demotions():
    b = bundle()
    f = UserFeatures("u", True, cf_vector=np.ones(2))
    cf = Retrieved(["t0", "t1", "t4"], np.array([3.0, 2.0, 1.0]))
    blended = blend_candidates(f, b, settings(source_weights={"cf": 1.0}), cf=cf, now_ms=NOW)
    items = rerank_candidates(blended, b, 3, settings(artist_cap=1))
    assert [i.track_id for i in items][:2] == ["t0", "t4"]
    assert "diversity_demoted" in items[2].sources


def test_candidates_cross_the_wire_as_catalog_positions_and_blend_the_same():
    b = bundle()
    f = UserFeatures("u", True, cf_vector=np.ones(2), recent_tracks=["t0"])
    (cf,) = retrieve_cf([(f, np.array([1.0, 0.2]))], b, 6)
    (content,) = retrieve_content([f], b, 6)
    wire_cf, wire_content = (placed_in(pickle.loads(pickle.dumps(r)), b, None) for r in (cf, content))
    here = blend_candidates(f, b, settings(), cf=cf, content=content, now_ms=NOW)
    there = blend_candidates(f, b, settings(), cf=wire_cf, content=wire_content, now_ms=NOW)
    assert list(there.track_ids) == list(here.track_ids) and list(there.reasons) == list(here.reasons)
    np.testing.assert_array_equal(there.scores, here.scores)


EVERY_FIELD_SET = [
    Retrieved(np.array(["t1", "t2"]), np.array([0.9, 0.1], dtype=np.float32), np.array([1, 2]), "v2", named=True),
    Blended(
        "u", True, np.array(["t3", "t1"]), np.array([2.0, 1.5]), Reasons(["cf", "recency_boost"], np.array([3, 1])),
        {"cf": "v1"}, "heavy", True, np.array([3, 1], dtype=np.int32), "v1",
    ),
    UserFeatures(
        "u", True, np.array([0.5, -1.0], dtype=np.float32), ["t1", "t2"], ["t2"], ["t3", "t4"], ["t5"], 7,
        UserPrefs(allow_explicit=False, blocked_tracks={"t6", "t7"}, blocked_artists={"a1"}),
        [("t8", 2.0)], [("t9", 1.0)], "ns1", "v1", True, np.array([4.0], dtype=np.float32),
    ),
]
BY_ID = [
    Retrieved(np.array(["t1", "t2"]), np.array([0.9, 0.1]), np.array([1, 2]), "v2"),  # placed: its ids stay behind
    Retrieved(["t1", "t2"], np.array([0.9, 0.1])),
    Blended("u", False, ["t3"], np.array([1.0]), Reasons.single("popular", 1), {}, "casual"),
    UserFeatures("new-listener", False),
    # An id holding the separator the wire joins ids with, and an empty one, still come back.
    UserFeatures("u", True, recent_tracks=["odd\x1fid", ""], seen_tracks=[""], prefs=UserPrefs(blocked_tracks={"x\x1fy"})),
]


@pytest.mark.parametrize("protocol", [pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize(
    "value", EVERY_FIELD_SET + BY_ID,
    ids=[
        "retrieved-placed-named", "blended-placed", "features", "retrieved-placed", "retrieved-by-id", "blended-by-id",
        "features-defaults", "features-odd-ids",
    ],
)
def test_stage_values_cross_the_wire_whole(value, protocol):
    """Every field survives the trip (arrays as buffers, app/wire.py), but a placed
    Retrieved's ids, which it leaves behind unless it is named."""
    back = pickle.loads(pickle.dumps(value, protocol=protocol))
    for f in fields(value):
        sent, got = getattr(value, f.name), getattr(back, f.name)
        if f.name == "track_ids" and isinstance(value, Retrieved) and value.indices is not None and not value.named:
            assert got is None
        elif f.name == "reasons":
            assert got.names == sent.names and got.masks.tolist() == sent.masks.tolist()
        elif isinstance(sent, np.ndarray):
            assert got.dtype == sent.dtype and got.tolist() == sent.tolist() and got.flags.writeable, f.name
        else:
            assert got == sent, f.name


@pytest.mark.parametrize("value", [*EVERY_FIELD_SET, EVERY_FIELD_SET[2].prefs], ids=["retrieved", "blended", "features", "prefs"])
def test_the_wire_test_sets_every_field(value):
    """A field added to the class fails here until the test above sets it, so a __reduce_ex__
    that forgets it cannot pass unnoticed."""
    def at_default(f) -> bool:
        got = getattr(value, f.name)
        default = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else MISSING
        return default is not MISSING and not isinstance(got, np.ndarray) and got == default

    assert not [f.name for f in fields(value) if at_default(f)]


def test_candidates_from_a_catalog_reloaded_in_between_are_matched_by_track_id():
    """A retriever or blender may still hold the previous catalog when the next stage has
    reloaded: positions then mean other tracks, so the next stage must go by track id and drop
    tracks the new catalog no longer has."""
    old, new = bundle(), bundle()
    new.track_ids = np.array([f"t{i}" for i in (7, 6, 5, 4, 3, 2, 1, 8)], dtype=object)  # reordered, t0 gone
    new.versions = {"cf": "v2", "content": "v2"}
    new.__post_init__()
    f = UserFeatures("u", True, cf_vector=np.ones(2))
    (cf,) = retrieve_cf([(f, np.array([1.0, 0.0]))], old, 3)  # t0, t1, t2 by position in `old`
    blended = blend_candidates(f, new, settings(source_weights={"cf": 1.0}), cf=cf, now_ms=NOW)
    assert list(blended.track_ids) == ["t1", "t2"]  # mapped by id; t0 is not in the new catalog
    # Between replicas the candidates travel as positions only; the Blender names them from
    # its previous bundle, or drops them rather than read them in the wrong catalog.
    wire = pickle.loads(pickle.dumps(cf))
    assert wire.track_ids is None and list(wire.indices) == [0, 1, 2]
    placed = placed_in(wire, new, old)
    from_wire = blend_candidates(f, new, settings(source_weights={"cf": 1.0}), cf=placed, now_ms=NOW)
    assert list(from_wire.track_ids) == ["t1", "t2"]
    assert len(placed_in(wire, new, None).track_ids) == 0
    blended_old = blend_candidates(f, old, settings(source_weights={"cf": 1.0}), cf=cf, now_ms=NOW)
    ranked = rerank_candidates(blended_old, new, 3, settings())
    assert [i.track_id for i in ranked] == ["t1", "t2"]
    assert [i.artist_id for i in ranked] == ["a2", "a1"]  # metadata from the catalog now held


def test_candidates_from_a_catalog_the_blender_does_not_hold_yet_are_blended_by_their_ids():
    """A retriever that reloaded a moment ago sends its candidates named: the Blender, still on
    the catalog before (and so with no way to read positions in the new one), blends them by
    track id instead of dropping them."""
    old, new = bundle(), bundle()
    new.track_ids = np.array([f"t{i}" for i in (7, 6, 5, 4, 3, 2, 1, 8)], dtype=object)
    new.versions = {"cf": "v2", "content": "v2"}
    new.__post_init__()
    f = UserFeatures("u", True, cf_vector=np.ones(2))
    (cf,) = retrieve_cf([(f, np.array([1.0, 0.0]))], new, 3)
    assert len(placed_in(pickle.loads(pickle.dumps(cf)), old, None).track_ids) == 0
    cf.named = True
    placed = placed_in(pickle.loads(pickle.dumps(cf)), old, None)
    blended = blend_candidates(f, old, settings(source_weights={"cf": 1.0}), cf=placed, now_ms=NOW)
    assert list(blended.track_ids) == ["t7", "t6", "t5"] == list(cf.track_ids)


def test_preferences_parse_from_redis_hash():
    prefs = prefs_from_hash({"allow_explicit": "0", "blocked_tracks": "t1\x1ft2"})
    assert prefs == UserPrefs(False, {"t1", "t2"}, set())


def test_stored_vector_of_another_model_version_is_replaced_by_a_fold_in():
    from deployments.retrieval import fold_in_vector
    from training.als import ImplicitALS

    b = bundle()
    model = ImplicitALS.from_factors(np.zeros((1, 2), np.float32), b.item_factors, regularization=1.0, alpha=10.0)
    stored = np.array([-5.0, 5.0], dtype=np.float32)
    same = UserFeatures("u", True, cf_vector=stored, seen_tracks=["t0", "t1"], cf_version="v1")
    other = UserFeatures("u", True, cf_vector=stored, seen_tracks=["t0", "t1"], cf_version="v0")
    np.testing.assert_array_equal(fold_in_vector(same, b, model, 3.0), stored)
    refreshed = fold_in_vector(other, b, model, 3.0)
    np.testing.assert_allclose(refreshed, model.fold_in(b.indices(["t0", "t1"])))
    assert refreshed[0] > refreshed[1]  # t0, t1 live on the first factor
    fresh = UserFeatures("u", True, cf_vector=stored, seen_tracks=["t0"], online_recent=["t5", "t6"], cf_version="v1")
    assert fold_in_vector(fresh, b, model, 3.0)[1] > 0  # the new session pulls towards the second factor


def test_fold_in_weighs_the_history_as_training_did():
    """A skipped or disliked track weighed 0 in training and a like 4: the request-time fold-in
    solves the same problem, plus the fresh plays at their own weight."""
    from deployments.retrieval import fold_in_vector
    from training.als import ImplicitALS

    b = bundle()
    model = ImplicitALS.from_factors(np.zeros((1, 2), np.float32), b.item_factors, regularization=1.0, alpha=10.0)
    f = UserFeatures(
        "u", True, seen_tracks=["t0", "t4", "t5"], seen_weights=np.array([4.0, 0.0, 0.0], dtype=np.float32),
        online_recent=["t1"], cf_version="v1",
    )
    expected = model.fold_in(b.indices(["t0", "t1"]), np.array([4.0, 3.0]))
    np.testing.assert_allclose(fold_in_vector(f, b, model, 3.0), expected)
    assert expected[1] == pytest.approx(0.0, abs=1e-6)  # the skipped t4, t5 (second factor) pulled nothing
