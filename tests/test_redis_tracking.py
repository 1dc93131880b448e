"""TrackedReads (app/redis_tracking.py) against a real redis-server: a cached read costs
Redis nothing, and every way a key can change or the tracking can be lost is seen by the
next read."""

import pytest
import redis

from app.redis_tracking import tracked_reads
from app.redis_wire import as_dict, pack


def calls(client: redis.Redis, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def hgetall(key: bytes) -> tuple[bytes, bytes]:
    return key, pack(b"HGETALL", key)


def lrange(key: bytes, n: int) -> tuple[bytes, bytes]:
    return key, pack(b"LRANGE", key, b"0", b"%d" % (n - 1))


@pytest.fixture
def cache(redis_client):
    c = tracked_reads(redis_client, max_entries=100)
    yield c
    c.clear()


def test_a_cached_read_costs_redis_nothing_and_a_write_is_seen_by_the_next_read(cache, redis_client):
    redis_client.hset("prefs:u1", "explicit", "1")
    redis_client.lpush("recent:u1", "t1")
    reads = [hgetall(b"prefs:u1"), lrange(b"recent:u1", 5)]
    first = cache.replies(reads)
    before = calls(redis_client, "hgetall"), calls(redis_client, "lrange")
    assert cache.replies(reads) == first
    assert (calls(redis_client, "hgetall"), calls(redis_client, "lrange")) == before
    assert (cache.hits, cache.misses) == (2, 2)

    redis_client.lpush("recent:u1", "t2")  # a play, written by another client
    prefs, recent = cache.replies(reads)
    assert recent == [b"t2", b"t1"]
    assert as_dict(prefs) == {b"explicit": b"1"}
    assert calls(redis_client, "lrange") == before[1] + 1  # only the changed key was read again
    assert calls(redis_client, "hgetall") == before[0]


def test_deletes_expiries_and_flushes_are_seen(cache, redis_client):
    redis_client.hset("a", "f", "1")
    redis_client.hset("b", "f", "1")
    cache.replies([hgetall(b"a"), hgetall(b"b")])
    redis_client.delete("a")
    assert as_dict(cache.replies([hgetall(b"a")])[0]) == {}
    cache.replies([hgetall(b"a"), hgetall(b"b")])
    redis_client.flushdb()
    assert [as_dict(r) for r in cache.replies([hgetall(b"a"), hgetall(b"b")])] == [{}, {}]
    assert len(cache) == 2  # read again (empty) and cached again
    redis_client.hset("c", "f", "1")
    cache.replies([hgetall(b"c")])
    redis_client.pexpire("c", 1)
    while redis_client.exists("c"):  # touching the key once its millisecond is up deletes it
        pass
    assert as_dict(cache.replies([hgetall(b"c")])[0]) == {}


def test_a_lost_connection_is_reported_and_never_answered_from_stale_memory(cache, redis_client, redis_server):
    redis_client.hset("prefs:u1", "explicit", "1")
    cache.replies([hgetall(b"prefs:u1")])
    with redis.Redis.from_url(redis_server.url) as admin:
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1  # the tracking connection too
        admin.hset("prefs:u1", "explicit", "0")  # no one tracks it for the cache any more
    with pytest.raises(redis.ConnectionError):
        cache.replies([hgetall(b"prefs:u1")])
    assert len(cache) == 0
    assert as_dict(cache.replies([hgetall(b"prefs:u1")])[0]) == {b"explicit": b"0"}
    redis_client.hset("prefs:u1", "explicit", "1")  # tracking is on again on the new connection
    assert as_dict(cache.replies([hgetall(b"prefs:u1")])[0]) == {b"explicit": b"1"}


def test_an_error_reply_is_raised_not_cached_and_the_rest_of_the_batch_is(cache, redis_client):
    redis_client.set("s", "not a hash")
    redis_client.hset("h", "f", "v")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        cache.replies([hgetall(b"s"), hgetall(b"h")])
    assert len(cache) == 1
    before = calls(redis_client, "hgetall")
    assert as_dict(cache.replies([hgetall(b"h")])[0]) == {b"f": b"v"}  # cached, and in step
    assert calls(redis_client, "hgetall") == before


def test_the_least_recently_used_replies_go_first(redis_client):
    cache = tracked_reads(redis_client, max_entries=2)
    for key in ("a", "b", "c"):
        redis_client.hset(key, "f", key)
    cache.replies([hgetall(b"a"), hgetall(b"b")])
    cache.replies([hgetall(b"a")])  # a is now the most recently used
    cache.replies([hgetall(b"c")])  # b goes
    before = calls(redis_client, "hgetall")
    cache.replies([hgetall(b"a"), hgetall(b"c")])
    assert calls(redis_client, "hgetall") == before
    cache.replies([hgetall(b"b")])
    assert calls(redis_client, "hgetall") == before + 1
    assert len(cache) == 2
    cache.clear()


def test_a_cluster_client_or_no_room_gets_no_cache(redis_client):
    assert tracked_reads(redis_client, max_entries=0) is None
    assert tracked_reads(object(), max_entries=10) is None
