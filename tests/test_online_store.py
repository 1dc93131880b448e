"""One contract suite, run against every OnlineStore implementation."""

import time

import numpy as np
import pytest
import redis

from app.features.registry import load_registry
from app.features.store import InMemoryOnlineStore, LiveRead, Published, RedisOnlineStore
from app.config import PROJECT_ROOT
from app.keys import Keys
from tests.clock import FakeClock
from tests.waiting import poll

REGISTRY = load_registry(PROJECT_ROOT / "feature_repo")
USER = REGISTRY["user_profile"]
TRACK = REGISTRY["track_profile"]


@pytest.fixture(params=["redis", "memory"])
def store(request):
    if request.param == "redis":
        return RedisOnlineStore(request.getfixturevalue("redis_client"), Keys("test"))
    return InMemoryOnlineStore()


def test_roundtrip_vectors_lists_and_scalars(store):
    vec = np.arange(4, dtype=np.float32) / 3
    store.write("v1", USER, [("u1", {"cf_vector": vec, "recent_tracks": ["t1", "t2"], "n_plays": 7})])
    store.write("v1", TRACK, [("t1", {"explicit": True, "plays": 2.5, "genre": "jazz"})])
    user, track = store.read("v1", [(USER, "u1"), (TRACK, "t1")]).rows
    np.testing.assert_array_equal(user["cf_vector"], vec)
    assert user["cf_vector"].dtype == np.float32
    assert user["recent_tracks"] == ["t1", "t2"] and user["n_plays"] == 7
    assert track == {"explicit": True, "plays": 2.5, "genre": "jazz"}


def test_missing_entity_reads_none_and_namespaces_are_isolated(store):
    store.write("v1", USER, [("u1", {"n_plays": 1})])
    rows = store.read("v2", [(USER, "u1"), (USER, "nobody")]).rows
    assert rows == [None, None]


def test_view_versions_are_isolated(store):
    store.write("v1", USER, [("u1", {"n_plays": 1})])
    v2 = USER.model_copy(update={"version": 2})
    assert store.read("v1", [(v2, "u1")]).rows == [None]


def test_rankings_come_back_best_first_in_the_same_read(store):
    store.write("v1", USER, [("u1", {"n_plays": 1})])
    store.write_ranking("v1", "trending", {"a": 1.0, "b": 3.0, "c": 2.0}, ttl_s=60)
    read = store.read("v1", [(USER, "u1")], rankings=[("trending", 2)])
    (row,), (ranked,) = read.rows, read.rankings
    assert row["n_plays"] == 1 and ranked == [("b", 3.0), ("c", 2.0)]


def test_rewriting_a_row_replaces_it(store):
    store.write("v1", USER, [("u1", {"n_plays": 1, "recent_tracks": ["x"]})])
    store.write("v1", USER, [("u1", {"n_plays": 2})])
    (row,) = store.read("v1", [(USER, "u1")]).rows
    assert row == {"n_plays": 2}


def test_live_lists_and_hashes_come_back_in_the_same_read(store, redis_client):
    if isinstance(store, InMemoryOnlineStore):
        store.set_live("test:recent:u1", ["t3", "t2", "t1"])
        store.set_live("test:prefs:u1", {"explicit": "0"})
    else:
        redis_client.rpush("test:recent:u1", "t3", "t2", "t1")
        redis_client.hset("test:prefs:u1", "explicit", "0")
    live = [LiveRead("list", "test:recent:u1", 2), LiveRead("hash", "test:prefs:u1"), LiveRead("list", "test:recent:nobody")]
    read = store.read("v1", [(USER, "u1")], live=live)
    assert read.rows == [None]
    assert read.live == [["t3", "t2"], {"explicit": "0"}, []]


def test_publish_switches_and_returns_previous(store):
    assert store.current() is None
    assert store.publish(Published("v1", REGISTRY, {"as_of": "x"})) is None
    assert store.publish(Published("v2", REGISTRY, {})) == "v1"
    current = store.current()
    assert current.namespace == "v2" and current.registry == REGISTRY


def test_alias_in_the_older_bare_format_is_replaced_not_fatal(redis_client):
    store = RedisOnlineStore(redis_client, Keys("test"))
    redis_client.set(Keys("test").feature_alias(), "20261126T000000Z-abc")
    assert store.current() is None
    assert store.publish(Published("v2", REGISTRY, {})) == "20261126T000000Z-abc"
    assert store.current().namespace == "v2"


def test_expired_namespace_disappears(store, redis_client):
    store.write("old", USER, [("u1", {"n_plays": 1})])
    store.write_ranking("old", "popular", {"a": 1.0}, ttl_s=60)
    assert store.expire_namespace("old", 1) == 2
    if isinstance(store, InMemoryOnlineStore):
        store._clock = lambda: time.monotonic() + 2
    else:
        # Until Redis expires the namespace's keys (touching an expired key deletes it).
        keys = [Keys("test").feature_hash("old", USER.key, "u1"), Keys("test").ranking("old", "popular")]
        poll(lambda: redis_client.exists(*keys), lambda n: n == 0, 1_000_000)
    read = store.read("old", [(USER, "u1")], rankings=[("popular", 5)])
    assert (read.rows, read.rankings) == ([None], [[]])


def test_a_namespace_is_due_for_renewal_once_its_first_key_has_used_half_its_ttl(store, redis_client):
    """What jobs.pipeline asks before skipping an unchanged materialisation."""
    from jobs.pipeline import renewal_due

    def due(namespace: str = "ns") -> str | None:
        return renewal_due(namespace, store.first_expiry_s(namespace), REGISTRY)

    store.write("ns", USER, [("u1", {"n_plays": 1}), ("u2", {"n_plays": 2})])
    assert due() is None
    assert due("never-written") is None  # nothing to renew
    # A day past half the TTL, for one of the keys.
    if isinstance(store, InMemoryOnlineStore):
        store._clock = lambda: time.monotonic() + USER.ttl_s // 2 + 86_400
    else:
        redis_client.expire(Keys("test").feature_hash("ns", USER.key, "u1"), USER.ttl_s // 2 - 86_400)
    assert "written again" in due()


def test_rows_expire_after_the_view_ttl(redis_client):
    clock = FakeClock()
    short = USER.model_copy(update={"ttl_s": 5})
    memory = InMemoryOnlineStore(clock=clock)
    memory.write("v1", short, [("u1", {"n_plays": 1})])
    clock.now += 6
    assert memory.read("v1", [(short, "u1")]).rows == [None]
    redis_store = RedisOnlineStore(redis_client, Keys("test"))
    redis_store.write("v1", short.model_copy(update={"ttl_s": 1}), [("u1", {"n_plays": 1})])
    rows = poll(lambda: redis_store.read("v1", [(short, "u1")]).rows, lambda r: r == [None], 1_000_000)  # until Redis expires it
    assert rows == [None]


class CountingConnection(redis.Connection):
    sends = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


def test_redis_read_of_many_entities_and_views_is_one_round_trip(redis_server):
    client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(redis_server.url, connection_class=CountingConnection))
    client.flushdb()
    store = RedisOnlineStore(client, Keys("test"))
    store.write("v1", USER, [(f"u{i}", {"n_plays": i}) for i in range(5)])
    store.write("v1", TRACK, [(f"t{i}", {"genre": "rock"}) for i in range(5)])
    CountingConnection.sends = 0
    requests = [(USER, f"u{i}") for i in range(5)] + [(TRACK, f"t{i}") for i in range(5)]
    live = [LiveRead("list", "test:recent:u1", 3), LiveRead("hash", "test:prefs:u1")]
    rows = store.read("v1", requests, rankings=[("popular", 5)], live=live).rows
    assert [r["n_plays"] for r in rows[:5]] == list(range(5)) and rows[5]["genre"] == "rock"
    assert CountingConnection.sends == 1  # 10 HGETALL + ZREVRANGE + LRANGE + HGETALL: one write


def test_empty_lists_roundtrip_and_separator_in_items_is_refused(store):
    store.write("v1", USER, [("u1", {"recent_tracks": [], "n_plays": 0})])
    (row,) = store.read("v1", [(USER, "u1")]).rows
    assert row == {"recent_tracks": [], "n_plays": 0}
    with pytest.raises(ValueError, match="recent_tracks"):
        store.write("v1", USER, [("u1", {"recent_tracks": ["a\x1fb"]})])


# --- what jobs.materialize writes ------------------------------------------------------------


@pytest.mark.parametrize("unit", ["ms", "us", "ns"])
def test_release_date_materialises_as_epoch_ms_whatever_its_unit_and_a_missing_one_is_absent(
    unit, tmp_path, redis_server, redis_client
):
    """The world's catalogue stores ms, normalise_catalog's µs: both must reach serving's
    recency boost as epoch milliseconds, and the offline snapshot must agree with Redis."""
    import pandas as pd

    from app.artifacts import ArtifactStore
    from app.config import settings_from_args
    from app.features.offline import OfflineSnapshots
    from app.features.parity import compare_view
    from jobs.materialize import build_views, write_rows

    settings = settings_from_args({"paths": {"state_dir": str(tmp_path)}})
    store = ArtifactStore(settings.paths.artifacts_dir)
    with store.publish("content") as out:
        dates = pd.to_datetime(["2020-01-01", None], utc=True).as_unit(unit)
        pd.DataFrame({"track_id": ["t1", "t2"], "genre": ["rock", "jazz"], "release_date": dates}).to_parquet(out / "tracks.parquet")
        np.save(out / "embeddings.npy", np.eye(2, dtype=np.float32))
    rows = build_views(settings, store)[0]["track_profile"]

    frame = rows.rename_axis("entity_id").reset_index()  # as write_online hands it to its writers
    write_rows(frame, redis_server.url, "test", "v1", TRACK.model_dump_json(), write_batch=10)
    online = RedisOnlineStore(redis_client, Keys("test"))
    dated, undated = online.read("v1", [(TRACK, "t1"), (TRACK, "t2")]).rows
    assert dated["release_ms"] == 1577836800000
    assert "release_ms" not in undated and undated["genre"] == "jazz"

    offline = OfflineSnapshots(tmp_path / "features")
    offline.write("v1", TRACK, rows, as_of=None)
    assert compare_view(online, "v1", TRACK, offline.load(TRACK, "v1"), sample=10)["mismatches"] == 0


def test_a_listeners_history_carries_the_weight_cf_training_gives_each_track():
    """What the request-time fold-in weighs the history by: like 4 + play 1, two plays, a skip 0."""
    import pandas as pd

    from jobs.materialize import user_history

    start = pd.Timestamp("2026-01-01", tz="UTC")
    events = pd.DataFrame({
        "user_id": ["u"] * 5,
        "track_id": ["b", "a", "b", "c", "a"],
        "event_type": ["play", "like", "play", "skip", "play"],
        "timestamp": [start + pd.Timedelta(minutes=i) for i in range(5)],
    })
    row = user_history(events, None, 10, 30.0, {"play": 1.0, "like": 4.0, "skip": 0.0}).loc["u"]
    assert row["seen_tracks"] == ["a", "b", "c"] and row["seen_weights"].tolist() == [5.0, 2.0, 0.0]
    assert row["recent_tracks"] == ["a", "b"]


def test_the_blends_trending_list_ranks_as_the_trending_api_does():
    """By the smoothed rank_score /v1/trending orders by, not this run's raw score."""
    import pandas as pd

    from jobs.materialize import shared_rankings

    trending = pd.DataFrame({"track_id": ["steady", "spike"], "score": [1.0, 9.0], "rank_score": [5.0, 4.0]})
    popular = pd.DataFrame({"track_id": ["p"], "score": [3.0]})
    rankings = shared_rankings(trending, popular)
    assert sorted(rankings["trending"], key=rankings["trending"].get, reverse=True) == ["steady", "spike"]
    assert rankings["popular"] == {"p": 3.0}
    assert shared_rankings(trending.drop(columns="rank_score"), popular)["trending"] == {"steady": 1.0, "spike": 9.0}
