"""The packed read path the feature store uses on a single server (app/redis_wire.py): replies
in order and shaped as redis-py's own, an error reply that leaves the connection usable, and a
connection the server dropped replaced transparently. Real redis-server, both protocols."""

import pytest
import redis

from app.redis_wire import as_dict, as_scored, pack, raw_replies


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def client(request, redis_server, redis_client):
    c = redis.Redis.from_url(redis_server.url, protocol=request.param)
    yield c
    c.close()


def test_replies_come_back_in_order_shaped_like_redis_py(client):
    client.hset("h", mapping={"a": b"\x00\r\n", "b": "2"})
    client.zadd("z", {"x": 1.5, "y": 3.0})
    client.rpush("l", "p", "q")
    replies = raw_replies(client, [
        pack(b"HGETALL", b"h"), pack(b"HGETALL", b"absent"),
        pack(b"ZREVRANGE", b"z", b"0", b"-1", b"WITHSCORES"), pack(b"LRANGE", b"l", b"0", b"-1"),
    ])  # fmt: skip
    assert as_dict(replies[0]) == client.hgetall("h") == {b"a": b"\x00\r\n", b"b": b"2"}
    assert as_dict(replies[1]) == {}
    assert [(m, float(s)) for m, s in as_scored(replies[2])] == [(b"y", 3.0), (b"x", 1.5)]
    assert replies[3] == [b"p", b"q"]


def test_an_error_reply_is_raised_and_the_connection_stays_in_step(client):
    client.set("s", "not a hash")
    client.hset("h", "f", "v")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        raw_replies(client, [pack(b"HGETALL", b"h"), pack(b"HGETALL", b"s"), pack(b"HGETALL", b"h")])
    # the replies after the error were read, so the next caller gets its own
    assert [as_dict(r) for r in raw_replies(client, [pack(b"HGETALL", b"h")])] == [{b"f": b"v"}]


def test_a_connection_the_server_dropped_is_replaced(client, redis_server):
    client.hset("h", "f", "v")
    raw_replies(client, [pack(b"HGETALL", b"h")])  # leaves one connection in the pool
    with redis.Redis.from_url(redis_server.url) as admin:
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
    assert as_dict(raw_replies(client, [pack(b"HGETALL", b"h")])[0]) == {b"f": b"v"}
