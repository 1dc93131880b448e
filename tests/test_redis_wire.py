"""The packed read path the feature store uses on a single server (app/redis_wire.py): replies
in order and shaped as redis-py's own, an error reply that leaves the connection usable, and a
connection the server dropped replaced transparently. Real redis-server, both protocols, and
both of redis-py's parsers: hiredis (read directly) and the pure-Python one (read through
redis-py)."""

import pytest
import redis
from redis._parsers import _RESP2Parser, _RESP3Parser

from app.redis_wire import as_dict, as_scored, pack, pack_each, raw_replies


@pytest.fixture(params=[(2, None), (3, None), (2, _RESP2Parser), (3, _RESP3Parser)],
                ids=["resp2", "resp3", "resp2-python", "resp3-python"])  # fmt: skip
def client(request, redis_server, redis_client):
    protocol, parser = request.param
    kwargs = {"parser_class": parser} if parser else {}
    c = redis.Redis.from_url(redis_server.url, protocol=protocol, **kwargs)
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


def test_many_replies_larger_than_one_socket_read_arrive_whole_and_in_order(client):
    # 300 hashes of 2 KB: about 600 KB of replies, many times the parser's 64 KB read buffer
    pipe = client.pipeline(transaction=False)
    for i in range(300):
        pipe.hset(f"big{i}", mapping={"i": str(i), "blob": bytes([i % 256]) * 2048})
    pipe.execute()
    replies = raw_replies(client, pack_each(b"HGETALL", [f"big{i}".encode() for i in range(300)]))
    assert [as_dict(r)[b"i"] for r in replies] == [str(i).encode() for i in range(300)]
    assert all(as_dict(r)[b"blob"] == bytes([i % 256]) * 2048 for i, r in enumerate(replies))


def test_pack_each_packs_exactly_as_pack():
    keys = [b"a", b"user:\r\n:x", b"", "ü".encode()]
    assert pack_each(b"HGETALL", keys) == [pack(b"HGETALL", k) for k in keys]


def test_a_resp3_push_message_waiting_on_the_connection_is_not_taken_for_a_reply(redis_server, redis_client):
    # Client-side caching: the server pushes an invalidation onto the tracking connection when
    # another client changes a key it read; the next reads there must still get their replies.
    client = redis.Redis.from_url(redis_server.url, protocol=3)
    client.set("tracked", "1")
    conn = client.connection_pool.get_connection()
    for command in (("CLIENT", "TRACKING", "ON"), ("GET", "tracked")):
        conn.send_command(*command)
        conn.read_response()
    client.connection_pool.release(conn)
    redis_client.set("tracked", "2")  # the invalidation is now on its way to `conn`
    redis_client.hset("h", "f", "v")
    assert raw_replies(client, [pack(b"GET", b"tracked"), pack(b"HGETALL", b"h")]) == [b"2", {b"f": b"v"}]
    client.close()
