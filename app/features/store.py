"""Online feature store: an interface, a Redis implementation and an in-process one.

Writes are pipelined and non-transactional (as Feast's Redis store does): materialisation
writes a fresh namespace and only the alias switch has to be atomic. Reads of any number of
entities across views, plus ranked lists, go out as one pipeline: one network round trip.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Iterable

import redis

from app.features.views import FeatureView
from app.keys import Keys


class OnlineStore(ABC):
    @abstractmethod
    def write(self, namespace: str, view: FeatureView, rows: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Write (entity_id, row) pairs; returns how many were written."""

    @abstractmethod
    def write_ranking(self, namespace: str, name: str, scores: dict[str, float], ttl_s: int) -> None:
        """Replace a ranked list (trending, popular) in the namespace."""

    @abstractmethod
    def read(
        self, namespace: str, requests: list[tuple[FeatureView, str]], rankings: list[tuple[str, int]] = ()
    ) -> tuple[list[dict[str, Any] | None], list[list[tuple[str, float]]]]:
        """Rows for (view, entity_id) requests (None when absent) and the top-n of each ranking."""

    @abstractmethod
    def current_namespace(self) -> str | None: ...

    @abstractmethod
    def set_current_namespace(self, namespace: str) -> None: ...


class RedisOnlineStore(OnlineStore):
    def __init__(self, client: redis.Redis, keys: Keys):
        self.client = client
        self.keys = keys

    def write(self, namespace, view, rows, batch: int = 500) -> int:
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for entity_id, row in rows:
            key = self.keys.feature_hash(namespace, view.name, entity_id)
            mapping = view.encode(row)
            if not mapping:
                continue
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, view.ttl_s)
            n += 1
            if n % batch == 0:
                pipe.execute()
        pipe.execute()
        return n

    def write_ranking(self, namespace, name, scores, ttl_s) -> None:
        key = self.keys.ranking(namespace, name)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(key)
        if scores:
            pipe.zadd(key, scores)
            pipe.expire(key, ttl_s)
        pipe.execute()

    def read(self, namespace, requests, rankings=()):
        pipe = self.client.pipeline(transaction=False)
        for view, entity_id in requests:
            pipe.hgetall(self.keys.feature_hash(namespace, view.name, entity_id))
        for name, n in rankings:
            pipe.zrevrange(self.keys.ranking(namespace, name), 0, n - 1, withscores=True)
        results = pipe.execute()
        rows = [view.decode(raw) if raw else None for (view, _), raw in zip(requests, results)]
        ranked = [[(m.decode(), float(s)) for m, s in r] for r in results[len(requests):]]
        return rows, ranked

    def current_namespace(self) -> str | None:
        value = self.client.get(self.keys.feature_alias())
        return value.decode() if value else None

    def set_current_namespace(self, namespace: str) -> None:
        self.client.set(self.keys.feature_alias(), namespace)


class InMemoryOnlineStore(OnlineStore):
    """Same contract in a dict: for unit tests of serving logic and a degraded-mode snapshot."""

    def __init__(self, clock=time.monotonic):
        self._rows: dict[tuple[str, str, str], tuple[dict[str, Any], float]] = {}
        self._rankings: dict[tuple[str, str], tuple[dict[str, float], float]] = {}
        self._alias: str | None = None
        self._clock = clock

    def write(self, namespace, view, rows) -> int:
        n = 0
        for entity_id, row in rows:
            encoded = view.encode(row)
            if not encoded:
                continue
            decoded = view.decode({k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encoded.items()})
            self._rows[(namespace, view.name, entity_id)] = (decoded, self._clock() + view.ttl_s)
            n += 1
        return n

    def write_ranking(self, namespace, name, scores, ttl_s) -> None:
        self._rankings[(namespace, name)] = (dict(scores), self._clock() + ttl_s)

    def read(self, namespace, requests, rankings=()):
        now = self._clock()
        rows = []
        for view, entity_id in requests:
            hit = self._rows.get((namespace, view.name, entity_id))
            rows.append(dict(hit[0]) if hit and hit[1] > now else None)
        ranked = []
        for name, n in rankings:
            hit = self._rankings.get((namespace, name))
            items = sorted(hit[0].items(), key=lambda kv: -kv[1])[:n] if hit and hit[1] > now else []
            ranked.append(items)
        return rows, ranked

    def current_namespace(self) -> str | None:
        return self._alias

    def set_current_namespace(self, namespace: str) -> None:
        self._alias = namespace
