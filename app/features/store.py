"""Online feature store: an interface, a Redis implementation and an in-process one.

Writes are pipelined and non-transactional (as Feast's Redis store does): materialisation
writes a fresh namespace nobody reads yet, so only the switch has to be atomic. The switch is
one SET of the alias, whose value carries the namespace *and* the registry it was written
with, so a reader learns both in one GET and always decodes with the matching view versions.
Reads of any number of entities across views, plus ranked lists, go out in one round trip.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable

import redis

from app.features.registry import FeatureView, Registry
from app.keys import Keys
from app.redis_wire import as_dict, as_scored, pack, pack_each, raw_replies, supports_raw

log = logging.getLogger(__name__)

Rows = Iterable[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class LiveRead:
    """Un-versioned live state read in the same round trip as the features: a list (e.g. the
    plays the event consumer appended since training, newest first) or a hash (a user's
    preferences). `n` bounds a list read."""

    kind: str  # "list" | "hash"
    key: str
    n: int = 100


@dataclass
class StoreRead:
    rows: list[dict[str, Any] | None]
    rankings: list[list[tuple[str, float]]]
    live: list[Any]
    """Per LiveRead: a list of str, or a dict of str -> str (empty when absent)."""


@dataclass(frozen=True)
class Published:
    """What readers should read: a materialisation's namespace and its registry."""

    namespace: str
    registry: Registry
    meta: dict

    def to_json(self) -> str:
        return json.dumps({"namespace": self.namespace, "registry": json.loads(self.registry.to_json()), "meta": self.meta})

    @classmethod
    def from_json(cls, text: str | bytes) -> "Published":
        doc = json.loads(text)
        return cls(doc["namespace"], Registry.model_validate(doc["registry"]), doc.get("meta", {}))


def _namespace_of(alias: bytes) -> str:
    """The namespace an alias value names, in the current format or the older bare one."""
    try:
        return json.loads(alias)["namespace"]
    except (ValueError, KeyError, TypeError):
        return alias.decode()


class OnlineStore(ABC):
    @abstractmethod
    def write(self, namespace: str, view: FeatureView, rows: Rows) -> int:
        """Write (entity_id, row) pairs, replacing earlier rows; returns how many were written."""

    @abstractmethod
    def write_ranking(self, namespace: str, name: str, scores: dict[str, float], ttl_s: int) -> None:
        """Replace a ranked list (trending, popular) in the namespace."""

    @abstractmethod
    def read(
        self,
        namespace: str,
        requests: list[tuple[FeatureView, str]],
        rankings: Iterable[tuple[str, int]] = (),
        live: Iterable[LiveRead] = (),
    ) -> StoreRead:
        """Rows for (view, entity_id) requests (None when absent or expired), the top-n of
        each ranking (best first) and the live reads, in one round trip."""

    @abstractmethod
    def current(self) -> Published | None:
        """The published namespace and registry, or None before the first materialisation."""

    @abstractmethod
    def publish(self, published: Published) -> str | None:
        """Atomically point readers at a namespace; returns the namespace published before."""

    @abstractmethod
    def expire_namespace(self, namespace: str, seconds: int) -> int:
        """Let an old namespace's keys expire after a grace period; returns how many keys."""

    @abstractmethod
    def first_expiry_s(self, namespace: str) -> float | None:
        """Seconds until the namespace's first key expires; None when no key of it has a TTL."""


class RedisOnlineStore(OnlineStore):
    def __init__(self, client: redis.Redis, keys: Keys, write_batch: int = 500):
        self.client = client
        self.keys = keys
        self.write_batch = write_batch
        self._raw = supports_raw(client)
        """Reads skip redis-py's per-command pipeline work on a single server (app/redis_wire.py)."""

    def write(self, namespace, view, rows) -> int:
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for entity_id, row in rows:
            mapping = view.encode(row)
            if not mapping:
                continue
            key = self.keys.feature_hash(namespace, view.key, entity_id)
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, view.ttl_s)
            n += 1
            if n % self.write_batch == 0:
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

    def read(self, namespace, requests, rankings=(), live=()):
        rankings, live = list(rankings), list(live)
        hashes = [self.keys.feature_hash(namespace, view.key, entity_id) for view, entity_id in requests]
        ranking_keys = [(self.keys.ranking(namespace, name), n) for name, n in rankings]
        if self._raw:
            results = self._read_raw(hashes, ranking_keys, live)
        else:
            results = self._read_pipelined(hashes, ranking_keys, live)
        rows = [view.decode(raw) if raw else None for (view, _), raw in zip(requests, results)]
        end = len(requests) + len(rankings)
        ranked = [[(m.decode(), float(s)) for m, s in r] for r in results[len(requests):end]]
        lives = [
            [v.decode() for v in raw] if item.kind == "list" else {k.decode(): v.decode() for k, v in raw.items()}
            for item, raw in zip(live, results[end:])
        ]
        return StoreRead(rows, ranked, lives)

    def _read_pipelined(self, hashes, ranking_keys, live) -> list:
        pipe = self.client.pipeline(transaction=False)
        for key in hashes:
            pipe.hgetall(key)
        for key, n in ranking_keys:
            pipe.zrevrange(key, 0, n - 1, withscores=True)
        for item in live:
            if item.kind == "list":
                pipe.lrange(item.key, 0, item.n - 1)
            else:
                pipe.hgetall(item.key)
        return pipe.execute()

    def _read_raw(self, hashes, ranking_keys, live) -> list:
        """The same reads through app/redis_wire.py, shaped as the pipeline's callbacks would."""
        commands = pack_each(b"HGETALL", [key.encode() for key in hashes])
        commands += [pack(b"ZREVRANGE", key.encode(), b"0", b"%d" % (n - 1), b"WITHSCORES") for key, n in ranking_keys]
        commands += [
            pack(b"LRANGE", item.key.encode(), b"0", b"%d" % (item.n - 1)) if item.kind == "list" else pack(b"HGETALL", item.key.encode())
            for item in live
        ]
        replies = raw_replies(self.client, commands)
        n_hashes, n_ranked = len(hashes), len(ranking_keys)
        out = [as_dict(r) for r in replies[:n_hashes]]
        out += [as_scored(r) for r in replies[n_hashes : n_hashes + n_ranked]]
        out += [r if item.kind == "list" else as_dict(r) for item, r in zip(live, replies[n_hashes + n_ranked :])]
        return out

    def current(self) -> Published | None:
        value = self.client.get(self.keys.feature_alias())
        if not value:
            return None
        try:
            return Published.from_json(value)
        except ValueError:
            # An alias written by an older EchoTune (a bare namespace, no registry): nothing a
            # reader can decode; the next materialisation replaces it.
            log.warning("feature alias holds no registry (older format); treating as unpublished")
            return None

    def publish(self, published: Published) -> str | None:
        previous = self.client.set(self.keys.feature_alias(), published.to_json(), get=True)
        return _namespace_of(previous) if previous else None

    def first_expiry_s(self, namespace: str) -> float | None:
        keys = list(self.client.scan_iter(match=self.keys.namespace_pattern(namespace), count=1000))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
        remaining = [ms for ms in pipe.execute() if ms >= 0] if keys else []  # -1: no TTL, -2: gone
        return min(remaining) / 1000 if remaining else None

    def expire_namespace(self, namespace: str, seconds: int) -> int:
        n = 0
        pipe = self.client.pipeline(transaction=False)
        for key in self.client.scan_iter(match=self.keys.namespace_pattern(namespace), count=1000):
            pipe.expire(key, seconds)
            n += 1
        pipe.execute()
        return n


class InMemoryOnlineStore(OnlineStore):
    """The same contract in a dict: for unit tests and as the shape of a local snapshot."""

    def __init__(self, clock=time.monotonic):
        self._rows: dict[tuple[str, str, str], tuple[dict[str, Any], float]] = {}
        self._rankings: dict[tuple[str, str], tuple[dict[str, float], float]] = {}
        self._published: Published | None = None
        self._live: dict[str, Any] = {}
        self._clock = clock

    def set_live(self, key: str, value: list[str] | dict[str, str]) -> None:
        """What the event consumer (a list) or the preferences API (a hash) would have written."""
        self._live[key] = value

    def write(self, namespace, view, rows) -> int:
        n = 0
        for entity_id, row in rows:
            encoded = view.encode(row)
            if not encoded:
                continue
            # Round-trip through the encoding so both stores return identical values and types.
            decoded = view.decode({k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encoded.items()})
            self._rows[(namespace, view.key, entity_id)] = (decoded, self._clock() + view.ttl_s)
            n += 1
        return n

    def write_ranking(self, namespace, name, scores, ttl_s) -> None:
        self._rankings[(namespace, name)] = (dict(scores), self._clock() + ttl_s)

    def read(self, namespace, requests, rankings=(), live=()):
        now = self._clock()
        rows = []
        for view, entity_id in requests:
            hit = self._rows.get((namespace, view.key, entity_id))
            rows.append(dict(hit[0]) if hit and hit[1] > now else None)
        ranked = []
        for name, n in rankings:
            hit = self._rankings.get((namespace, name))
            ranked.append(sorted(hit[0].items(), key=lambda kv: -kv[1])[:n] if hit and hit[1] > now else [])
        lives = [
            list(self._live.get(item.key, []))[: item.n] if item.kind == "list" else dict(self._live.get(item.key, {}))
            for item in live
        ]
        return StoreRead(rows, ranked, lives)

    def current(self) -> Published | None:
        return self._published

    def publish(self, published: Published) -> str | None:
        previous, self._published = self._published, published
        return previous.namespace if previous else None

    def first_expiry_s(self, namespace: str) -> float | None:
        ends = [exp for store in (self._rows, self._rankings) for key, (_, exp) in store.items() if key[0] == namespace]
        finite = [e for e in ends if e != float("inf")]
        return min(finite) - self._clock() if finite else None

    def expire_namespace(self, namespace: str, seconds: int) -> int:
        deadline = self._clock() + seconds
        n = 0
        for key, (row, exp) in list(self._rows.items()):
            if key[0] == namespace:
                self._rows[key] = (row, min(exp, deadline))
                n += 1
        for key, (scores, exp) in list(self._rankings.items()):
            if key[0] == namespace:
                self._rankings[key] = (scores, min(exp, deadline))
                n += 1
        return n
