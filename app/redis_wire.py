"""Many read commands in one write, their raw replies read back in one loop.

redis-py's pipeline costs a few microseconds of Python per command on each side (building
the command, running its response callback, bookkeeping), which for the 500-entity feature
read the serving path does was half of the whole fetch: 2.97 ms p50 for the pipeline against
1.44 ms for the same HGETALLs packed into one buffer and read back raw on one pooled
connection (and a p99 of 15.9 ms against 2.0 ms, the pipeline's many small objects waking the
garbage collector). This module does only that: packing, one send, one read per reply, on a
plain `redis.Redis`; replies come back as the connection's protocol gives them (RESP3 maps,
or RESP2 flat lists), and `as_dict`/`as_scored` shape them. A cluster client uses its pipeline,
which splits commands by node.

With hiredis (a dependency), replies are taken straight from the connection's hiredis reader,
refilled from the socket as it runs dry: redis-py's `read_response` wrappers around that
reader were another 1 to 2 microseconds per reply, and packing each command part by part
another 0.6 (`pack_each` packs a command's head once). Together about a third of a
500-entity read: in one process, p50 2.0-2.3 ms before and 1.47 after, against 1.4 ms for the
server to answer and the bytes to arrive with no parsing at all; in benchmarks/feature_fetch.py
the p50 ratio against a redis-py pipeline went from 0.78 to 0.60.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import redis
from redis._parsers.hiredis import NOT_ENOUGH_DATA


def supports_raw(client: object) -> bool:
    """True for a single-server client (a cluster client is no `redis.Redis`)."""
    return isinstance(client, redis.Redis)


def as_dict(reply: dict | list) -> dict:
    """An HGETALL reply as a dict: RESP3 gives a map, RESP2 a flat field, value, ... list."""
    if isinstance(reply, dict):
        return reply
    it = iter(reply)
    return dict(zip(it, it))


def as_scored(reply: list) -> list[tuple[bytes, float | bytes]]:
    """A WITHSCORES reply as (member, score) pairs: RESP3 gives pairs, RESP2 a flat list."""
    if reply and isinstance(reply[0], list):
        return [(member, score) for member, score in reply]
    return list(zip(reply[::2], reply[1::2]))


def pack(*parts: bytes) -> bytes:
    """One command in the Redis wire format (a RESP array of bulk strings)."""
    return b"*%d\r\n" % len(parts) + b"".join([b"$%d\r\n%s\r\n" % (len(p), p) for p in parts])


def pack_each(command: bytes, keys: Iterable[bytes]) -> list[bytes]:
    """`command key` for every key, packed as `pack` would: the one-key read a many-entity
    fetch sends hundreds of, its head packed once."""
    head = b"*2\r\n$%d\r\n%s\r\n" % (len(command), command)
    return [head + b"$%d\r\n%s\r\n" % (len(key), key) for key in keys]


def _reply_source(conn) -> Callable[[], object]:
    """A function returning the connection's next reply: straight from its hiredis reader
    (refilled from the socket when it runs dry) as redis-py's own hiredis parser would return
    it, RESP3 push messages handed to the parser's handlers as it would; through
    `read_response` for any other parser."""
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    refill = getattr(parser, "read_from_socket", None)
    if reader is None or refill is None:
        return conn.read_response
    gets = reader.gets
    push_type = getattr(parser, "_hiredis_PushNotificationType", None)

    def next_reply():
        while True:
            reply = gets()
            while reply is NOT_ENOUGH_DATA:
                refill()
                reply = gets()
            if push_type is not None and isinstance(reply, push_type):
                parser.handle_push_response(reply)
                continue
            if isinstance(reply, redis.ResponseError):
                raise reply
            if isinstance(reply, Exception):  # the reader's protocol or connection error
                raise redis.ConnectionError(str(reply)) from reply
            return reply

    return next_reply


def raw_replies(client: redis.Redis, commands: Sequence[bytes]) -> list:
    """Send the packed `commands` in one write and return their replies in order. An error
    reply of one command is raised after every reply is read (the connection stays in step);
    a connection failing mid-exchange is closed, never handed back half-read. The pool itself
    replaces a pooled connection the server dropped (it checks before handing one out)."""
    pool = client.connection_pool
    conn = pool.get_connection()
    replies: list = []
    error: redis.ResponseError | None = None
    try:
        conn.send_packed_command([b"".join(commands)])
        next_reply = _reply_source(conn)
        for _ in commands:
            try:
                replies.append(next_reply())
            except redis.ResponseError as exc:
                error = error or exc
                replies.append(None)
    except BaseException:
        conn.disconnect()  # mid-read: the rest of the replies must not reach the next user
        raise
    finally:
        pool.release(conn)
    if error is not None:
        raise error
    return replies
