"""Degraded mode against a real redis-server that we stop mid-test."""

import pandas as pd
import redis

from app.config import PROJECT_ROOT
from app.features.offline import OfflineSnapshots
from app.features.reader import FeatureReader
from app.features.registry import load_registry
from app.features.store import Published, RedisOnlineStore
from app.keys import Keys
from app.redis_server import EmbeddedRedis

REGISTRY = load_registry(PROJECT_ROOT / "feature_repo")
USER = REGISTRY["user_profile"]


def test_reads_survive_redis_going_away(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        store = RedisOnlineStore(client, Keys("t"))
        store.write("ns1", USER, [("u1", {"n_plays": 3}), ("u2", {"n_plays": 4})])
        store.write_ranking("ns1", "popular", {"a": 2.0, "b": 1.0}, ttl_s=60)
        store.publish(Published("ns1", REGISTRY, {}))
        reader = FeatureReader(store, refresh_s=60, max_entries=1)

        fresh = reader.read([("user_profile", "u2"), ("user_profile", "u1")], rankings=[("popular", 5)])
        assert not fresh.stale and [r["n_plays"] for r in fresh.rows] == [4, 3]

        server.stop()
        stale = reader.read([("user_profile", "u1"), ("user_profile", "u2")], rankings=[("popular", 1)])
    finally:
        server.stop()
    assert stale.stale and stale.namespace == "ns1"
    # the snapshot is bounded to 1 entity: the most recently read one survives
    assert stale.rows == [{"n_plays": 3}, None]
    assert stale.rankings == [[("a", 2.0)]]


def test_nothing_published_reads_empty(redis_client):
    reader = FeatureReader(RedisOnlineStore(redis_client, Keys("t")), refresh_s=60, max_entries=10)
    read = reader.read([("user_profile", "u1")], rankings=[("trending", 3)])
    assert read.rows == [None] and read.rankings == [[]] and read.namespace is None and not read.stale


def test_point_in_time_uses_the_snapshot_valid_at_each_event(tmp_path):
    offline = OfflineSnapshots(tmp_path)
    for ns, as_of, plays in [("n1", "2026-01-01", 1), ("n2", "2026-01-10", 5)]:
        rows = pd.DataFrame({"n_plays": [plays, plays * 10]}, index=["u1", "u2"])
        offline.write(ns, USER, rows, pd.Timestamp(as_of, tz="UTC"))
        offline.finish(ns, REGISTRY, {"as_of": as_of})
    # a third snapshot that never finished must be ignored
    offline.write("n3", USER, pd.DataFrame({"n_plays": [99]}, index=["u1"]), pd.Timestamp("2026-01-05", tz="UTC"))

    events = pd.DataFrame(
        {
            "entity_id": ["u1", "u1", "u1", "u2"],
            "timestamp": pd.to_datetime(["2025-12-31", "2026-01-05", "2026-01-10", "2026-01-20"], utc=True),
        }
    )
    joined = offline.point_in_time(USER, events)
    # The event at 2026-01-10 is n2's latest event, so n2 was built from it: it gets n1's
    # features, not its own label's.
    assert joined["n_plays"].tolist()[1:] == [1, 1, 50]
    assert pd.isna(joined["n_plays"].iloc[0])  # before any snapshot: no features, no leakage
    assert joined["entity_id"].tolist() == ["u1", "u1", "u1", "u2"]


def test_point_in_time_takes_the_later_of_two_snapshots_with_the_same_data(tmp_path):
    """A re-materialisation over the same events (a new model, say) supersedes the earlier one
    for every entity, however many there are."""
    offline = OfflineSnapshots(tmp_path)
    users = [f"u{i}" for i in range(300)]
    for ns, plays in [("20260101T000000000000Z-aaaaaa", 1), ("20260101T010000000000Z-bbbbbb", 2)]:
        offline.write(ns, USER, pd.DataFrame({"n_plays": plays}, index=users), pd.Timestamp("2026-01-01", tz="UTC"))
        offline.finish(ns, REGISTRY, {"as_of": "2026-01-01"})
    events = pd.DataFrame({"entity_id": users, "timestamp": pd.Timestamp("2026-01-02", tz="UTC")})
    assert set(offline.point_in_time(USER, events)["n_plays"]) == {2}


def test_shared_lists_are_read_once_per_interval_and_survive_an_outage(tmp_path):
    from app.features.lists import SharedLists

    server = EmbeddedRedis(tmp_path / "lists", appendonly=False).start()
    now = [0.0]
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        store = RedisOnlineStore(client, Keys("t"))
        store.write_ranking("ns1", "popular", {"a": 2.0, "b": 1.0}, ttl_s=60)
        store.publish(Published("ns1", REGISTRY, {}))
        lists = SharedLists(FeatureReader(store, 60, 0, clock=lambda: now[0]), ("popular",), 5, 10.0, clock=lambda: now[0])
        assert lists.get()["popular"] == [("a", 2.0), ("b", 1.0)]
        store.write_ranking("ns1", "popular", {"c": 9.0}, ttl_s=60)
        assert lists.get()["popular"][0] == ("a", 2.0)  # within the interval: no new read
        now[0] = 11.0
        assert lists.get()["popular"] == [("c", 9.0)]
        server.stop()
        now[0] = 30.0
        assert lists.get()["popular"] == [("c", 9.0)] and lists.stale
    finally:
        server.stop()


def test_after_a_failed_read_redis_is_left_alone_for_retry_s_then_tried_again():
    """A hung Redis costs a whole socket timeout per attempt, on the replica's event loop: one
    attempt per `retry_s`, the reads in between answered from the snapshot at once."""
    from app.features.store import InMemoryOnlineStore

    class Unreachable(InMemoryOnlineStore):
        down, attempts = False, 0

        def read(self, *args, **kwargs):
            self.attempts += 1
            if self.down:
                raise redis.TimeoutError("Timeout reading from socket")
            return super().read(*args, **kwargs)

    now = [0.0]
    store = Unreachable(clock=lambda: now[0])
    store.write("ns1", USER, [("u1", {"n_plays": 3})])
    store.publish(Published("ns1", REGISTRY, {}))
    reader = FeatureReader(store, refresh_s=60, max_entries=10, clock=lambda: now[0], retry_s=1.0)
    assert reader.read([("user_profile", "u1")]).rows == [{"n_plays": 3}]

    store.down = True
    before = store.attempts
    reads = [reader.read([("user_profile", "u1")]) for _ in range(5)]
    assert store.attempts == before + 1  # one attempt, then the breaker
    assert all(r.stale and r.rows == [{"n_plays": 3}] for r in reads)

    now[0] = 1.5  # past retry_s: the next read tries Redis again, and it is back
    store.down = False
    fresh = reader.read([("user_profile", "u1")])
    assert not fresh.stale and store.attempts == before + 2


def test_a_replica_reader_moves_to_a_new_materialisation_only_when_refreshed():
    """Built with refresh_s=inf, reads never look up the alias again; refresh() (the replica's
    background thread) does. Unreachable, it keeps the alias it had and opens the breaker;
    reachable again, it closes the breaker without waiting out retry_s."""
    from app.features.store import InMemoryOnlineStore

    class Flaky(InMemoryOnlineStore):
        down, reads = False, 0

        def current(self):
            if self.down:
                raise redis.ConnectionError("Connection refused")
            return super().current()

        def read(self, *args, **kwargs):
            self.reads += 1
            return super().read(*args, **kwargs)

    store = Flaky()
    store.write("ns1", USER, [("u1", {"n_plays": 3})])
    store.publish(Published("ns1", REGISTRY, {}))
    reader = FeatureReader(store, refresh_s=float("inf"), max_entries=10, retry_s=3600.0)
    assert reader.read([("user_profile", "u1")]).namespace == "ns1"

    store.write("ns2", USER, [("u1", {"n_plays": 4})])
    store.publish(Published("ns2", REGISTRY, {}))
    assert reader.read([("user_profile", "u1")]).rows == [{"n_plays": 3}]  # still ns1
    reader.refresh()
    assert reader.read([("user_profile", "u1")]).rows == [{"n_plays": 4}]

    store.down = True
    reader.refresh()
    reads_before = store.reads
    during = reader.read([("user_profile", "u1")])
    assert during.stale and during.rows == [{"n_plays": 4}] and store.reads == reads_before
    store.down = False
    reader.refresh()  # the alias reads again: Redis is back, the breaker closes at once
    assert reader.read([("user_profile", "u1")]).namespace == "ns2"


def test_an_outage_keeps_what_filters_the_listeners_answers(tmp_path):
    """Blocks, the explicit setting and just-heard tracks, and the model version the stored
    vectors belong to, outlive an outage in the snapshot; a listener the snapshot never saw has
    unknown preferences (None), answered on the safe side, not the defaults."""
    from app.features.store import LiveRead
    from app.prefs import UserPrefs, prefs_or_safe

    keys = Keys("t")
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        store = RedisOnlineStore(client, keys)
        store.write("ns1", USER, [("u1", {"n_plays": 3})])
        store.publish(Published("ns1", REGISTRY, {"artifacts": {"cf": "v3"}}))
        client.rpush(keys.recent_plays("u1"), "t3", "t2", "t1")
        client.hset(keys.user_prefs("u1"), mapping={"allow_explicit": "1", "blocked_tracks": "t9"})
        reader = FeatureReader(store, refresh_s=60, max_entries=10)
        u1 = [LiveRead("list", keys.recent_plays("u1"), 2), LiveRead("hash", keys.user_prefs("u1"))]
        fresh = reader.read([("user_profile", "u1")], live=u1)

        server.stop()
        stale = reader.read([("user_profile", "u1"), ("user_profile", "u2")], live=[*u1, LiveRead("hash", keys.user_prefs("u2"))])
    finally:
        server.stop()
    assert stale.stale and stale.meta == {"artifacts": {"cf": "v3"}}
    assert stale.live[:2] == fresh.live and len(stale.live[0]) == 2
    assert [prefs_or_safe(p) for p in stale.live[1:]] == [UserPrefs(True, {"t9"}, set()), UserPrefs(allow_explicit=False)]
