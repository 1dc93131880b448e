"""One contract suite, run against every OnlineStore implementation."""

import numpy as np
import pytest
import redis

from app.features.store import InMemoryOnlineStore, RedisOnlineStore
from app.features.views import USER_PROFILE
from app.keys import Keys


@pytest.fixture(params=["redis", "memory"])
def store(request):
    if request.param == "redis":
        return RedisOnlineStore(request.getfixturevalue("redis_client"), Keys("test"))
    return InMemoryOnlineStore()


def test_roundtrip_vectors_lists_and_scalars(store):
    vec = np.arange(4, dtype=np.float32) / 3
    store.write("v1", USER_PROFILE, [("u1", {"cf_vector": vec, "recent_tracks": ["t1", "t2"], "n_plays": 7})])
    (row,), _ = store.read("v1", [(USER_PROFILE, "u1")])
    np.testing.assert_array_equal(row["cf_vector"], vec)
    assert row["cf_vector"].dtype == np.float32
    assert row["recent_tracks"] == ["t1", "t2"] and row["n_plays"] == 7


def test_missing_entity_reads_none_and_namespaces_are_isolated(store):
    store.write("v1", USER_PROFILE, [("u1", {"n_plays": 1})])
    rows, _ = store.read("v2", [(USER_PROFILE, "u1"), (USER_PROFILE, "nobody")])
    assert rows == [None, None]


def test_rankings_come_back_best_first_in_the_same_read(store):
    store.write("v1", USER_PROFILE, [("u1", {"n_plays": 1})])
    store.write_ranking("v1", "trending", {"a": 1.0, "b": 3.0, "c": 2.0}, ttl_s=60)
    (row,), (ranked,) = store.read("v1", [(USER_PROFILE, "u1")], rankings=[("trending", 2)])
    assert row["n_plays"] == 1 and ranked == [("b", 3.0), ("c", 2.0)]


def test_rewriting_a_row_replaces_it(store):
    store.write("v1", USER_PROFILE, [("u1", {"n_plays": 1, "recent_tracks": ["x"]})])
    store.write("v1", USER_PROFILE, [("u1", {"n_plays": 2})])
    (row,), _ = store.read("v1", [(USER_PROFILE, "u1")])
    assert row == {"n_plays": 2}


def test_alias_switch(store):
    assert store.current_namespace() is None
    store.set_current_namespace("v1")
    store.set_current_namespace("v2")
    assert store.current_namespace() == "v2"


class CountingConnection(redis.Connection):
    sends = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


def test_redis_read_is_one_round_trip(redis_server):
    client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(redis_server.url, connection_class=CountingConnection))
    client.flushdb()
    store = RedisOnlineStore(client, Keys("test"))
    store.write("v1", USER_PROFILE, [(f"u{i}", {"n_plays": i}) for i in range(5)])
    CountingConnection.sends = 0
    rows, _ = store.read("v1", [(USER_PROFILE, f"u{i}") for i in range(5)], rankings=[("popular", 5)])
    assert [r["n_plays"] for r in rows] == list(range(5))
    assert CountingConnection.sends == 1  # 5 HGETALL + 1 ZREVRANGE in one write, one read
