"""Read replies kept in this process for as long as Redis says their keys are unchanged.

Server-assisted client-side caching: the cache reads over one connection of its own in RESP3
with `CLIENT TRACKING ON`, so Redis remembers which keys that connection read and, when one
is written, deleted, expires or the database is flushed, pushes an invalidation down the
same connection. A read of a key still cached is then answered from memory, with no round
trip; a changed key is read again. redis-py's own client-side cache needs Redis >= 7.4 and
does not cover pipelines; this covers the packed reads of app/redis_wire.py on any Redis
with tracking (6.0+).

Why it is safe for serving (recent plays, preferences, features):
- Redis sends a key's invalidation while it executes the write, before it answers the
  writer, and on this connection in order with our replies. Before answering from memory,
  the cache takes in every push already sent, so a write acknowledged to its writer before
  a read began is never missed.
- A push read between two replies of one batch is applied where it arrives: a key whose
  reply was cached earlier in the batch is dropped again.
- Any error on the connection (a server restart, a killed client, a timeout) drops the
  connection and everything cached with it: the server's tracking of this client is gone
  too. The next read connects again, turns tracking back on and reads from Redis.

Measured in benchmarks/serve.py (README § Serving): the FeatureFetcher's one round trip per
batch cost the chain about 0.7 ms at p50 and 2 ms at p95 of 50 req/s on 2 cores, far more
than the 0.1-0.3 ms the same read takes alone, because under load the answer waits for
redis-server to be scheduled and for cold caches on both sides.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

import hiredis
import redis
from redis._parsers.hiredis import NOT_ENOUGH_DATA

from app.redis_wire import supports_raw


class TrackedReads:
    """Replies of read commands, each for one key, from memory while the key is unchanged.

    `connect` makes a new, unconnected redis-py connection with protocol=3 (`tracked_reads`
    builds one from a client). At most `max_entries` replies are kept (least recently used
    go first). Replies are shared between callers: treat them as read-only."""

    def __init__(self, connect: Callable[[], redis.Connection], max_entries: int):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._connect = connect
        self.max_entries = max_entries
        self._conn: redis.Connection | None = None
        self._entries: OrderedDict[bytes, tuple[bytes, object]] = OrderedDict()  # key -> (command, reply)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def replies(self, reads: Sequence[tuple[bytes, bytes]]) -> list:
        """The reply of each (key, packed command reading only that key), in order: cached
        ones from memory, the others in one round trip. Raises redis.ConnectionError or
        TimeoutError as a plain read would, and redis.ResponseError (after reading every
        reply) for an error reply, which is not cached."""
        with self._lock:
            try:
                return self._replies(reads)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._reset()
                raise

    def clear(self) -> None:
        with self._lock:
            self._reset()

    def _replies(self, reads: Sequence[tuple[bytes, bytes]]) -> list:
        conn = self._connection()
        self._take_pushes(conn)
        out: list = [None] * len(reads)
        missing = []
        for i, (key, command) in enumerate(reads):
            entry = self._entries.get(key)
            if entry is not None and entry[0] == command:
                self._entries.move_to_end(key)
                out[i] = entry[1]
            else:
                missing.append(i)
        self.hits += len(reads) - len(missing)
        self.misses += len(missing)
        if not missing:
            return out
        conn.send_packed_command([b"".join([reads[i][1] for i in missing])])
        error: redis.ResponseError | None = None
        for i in missing:
            reply = self._next_reply(conn)
            if isinstance(reply, redis.ResponseError):
                error = error or reply
                continue
            key, command = reads[i]
            # Cached as it is read: a push for this key later in the stream drops it again.
            self._entries[key] = (command, reply)
            self._entries.move_to_end(key)
            out[i] = reply
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if error is not None:
            raise error
        return out

    def _connection(self) -> redis.Connection:
        if self._conn is None:
            conn = self._connect()
            conn.connect()  # HELLO 3 included: the connection is made with protocol=3
            if getattr(conn._parser, "_reader", None) is None:
                conn.disconnect()
                raise RuntimeError("TrackedReads reads through hiredis; this connection has another parser")
            conn.send_command("CLIENT", "TRACKING", "ON")
            if conn.read_response() not in (b"OK", "OK"):
                conn.disconnect()
                raise redis.ConnectionError("CLIENT TRACKING ON was refused")
            self._entries.clear()
            self._conn = conn
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            self._conn.disconnect()
            self._conn = None
        self._entries.clear()

    def _take_pushes(self, conn: redis.Connection) -> None:
        """Apply every invalidation Redis has sent since the last read (nothing is asked, so
        anything waiting on the connection is a push)."""
        parser = conn._parser
        while True:
            message = parser._reader.gets()
            if message is NOT_ENOUGH_DATA:
                # can_read is True for a partly received push too: the rest is on its way.
                if not parser.can_read(0):
                    return
                parser.read_from_socket()
                continue
            if not isinstance(message, hiredis.PushNotification):
                raise redis.ConnectionError(f"unexpected reply with no command pending: {message!r}")
            self._apply(message)

    def _next_reply(self, conn: redis.Connection):
        parser = conn._parser
        while True:
            reply = parser._reader.gets()
            while reply is NOT_ENOUGH_DATA:
                parser.read_from_socket()
                reply = parser._reader.gets()
            if isinstance(reply, hiredis.PushNotification):
                self._apply(reply)
                continue
            if isinstance(reply, redis.ResponseError) or not isinstance(reply, Exception):
                return reply
            raise redis.ConnectionError(str(reply)) from reply

    def _apply(self, push: list) -> None:
        if len(push) < 2 or push[0] not in (b"invalidate", "invalidate"):
            return  # another kind of push (none is subscribed here): nothing cached depends on it
        keys = push[1]
        self.invalidations += 1
        if keys is None:  # FLUSHDB / FLUSHALL
            self._entries.clear()
            return
        for key in keys:
            self._entries.pop(key if isinstance(key, bytes) else key.encode(), None)


def tracked_reads(client: redis.Redis, max_entries: int) -> TrackedReads | None:
    """A TrackedReads over new RESP3 connections to `client`'s server with its settings
    (address, database, credentials, timeouts); None when `max_entries` is 0 or for a client
    that cannot have one (a cluster client: tracking would need a connection per node)."""
    if max_entries < 1 or not supports_raw(client):
        return None
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "protocol": 3}
    kwargs.pop("parser_class", None)  # hiredis, whose reader this module reads directly
    return TrackedReads(lambda: pool.connection_class(**kwargs), max_entries)
