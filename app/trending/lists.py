"""Published trending lists in Redis: one sorted set per list (global, genre:<g>, locale:<l>)
plus a hash of each track's details, replaced all at once.

A run writes every list under temporary keys, sets their TTL, then in one MULTI renames them
over the live keys and deletes the lists that no longer exist (a genre with no trend today),
so a reader sees the previous run's lists or this run's, never a mix. RENAME carries the TTL,
so lists vanish by themselves if the job stops running. Every key shares the `{trending}` hash
tag: on Redis Cluster they sit in one slot, which MULTI and RENAME require.

    lists = TrendingLists(client, prefix="echotune")
    lists.publish("v1", {"global": frame, "genre:rock": rock}, ttl_s=3600)
    lists.top("global", k=10)
"""

from __future__ import annotations

import json
import logging
import math

import pandas as pd
import redis

log = logging.getLogger(__name__)

DETAIL_FIELDS = ("score", "velocity", "confidence", "observed", "expected", "genre", "artist_id")


def list_name(genre: str | None = None, locale: str | None = None) -> str:
    """Name of the list serving a genre or locale filter (global without either)."""
    if locale:
        return f"locale:{locale}"
    if genre:
        return f"genre:{genre}"
    return "global"


class TrendingLists:
    def __init__(self, client: redis.Redis, prefix: str):
        self.client = client
        self.base = f"{prefix}:{{trending}}"

    def _list(self, name: str) -> str:
        return f"{self.base}:list:{name}"

    def _detail(self, name: str) -> str:
        return f"{self.base}:detail:{name}"

    @property
    def _names(self) -> str:
        return f"{self.base}:lists"

    @property
    def _meta(self) -> str:
        return f"{self.base}:meta"

    def publish(self, version: str, lists: dict[str, pd.DataFrame], ttl_s: int, meta: dict | None = None) -> None:
        """Replace every published list. Each frame has track_id and `rank_score` (the sorted
        set's score, best highest) plus any of DETAIL_FIELDS."""
        tmp = f"{self.base}:tmp:{version}"
        pipe = self.client.pipeline(transaction=False)
        live = {}
        for name, frame in lists.items():
            if frame.empty:
                continue
            zkey, hkey = f"{tmp}:list:{name}", f"{tmp}:detail:{name}"
            pipe.delete(zkey)  # one key per DEL: a cluster pipeline sends each to its slot's node
            pipe.delete(hkey)
            pipe.zadd(zkey, dict(zip(frame["track_id"], frame["rank_score"].astype(float))))
            pipe.hset(hkey, mapping={tid: json.dumps(_detail(row)) for tid, row in zip(frame["track_id"], frame.to_dict("records"))})
            pipe.expire(zkey, ttl_s)
            pipe.expire(hkey, ttl_s)
            live[name] = (zkey, hkey)
        pipe.execute()
        with self.client.pipeline(transaction=True) as swap:
            while True:
                try:
                    swap.watch(self._names)
                    old = {n.decode() for n in swap.smembers(self._names)}
                    swap.multi()
                    for name, (zkey, hkey) in live.items():
                        # execute_command: redis-py's cluster pipeline blocks its rename() method
                        # though RENAME within one slot is valid in a cluster MULTI.
                        swap.execute_command("RENAME", zkey, self._list(name))
                        swap.execute_command("RENAME", hkey, self._detail(name))
                    for name in old - set(live):
                        swap.delete(self._list(name), self._detail(name))
                    swap.delete(self._names)
                    if live:
                        swap.sadd(self._names, *live)
                        swap.expire(self._names, ttl_s)
                    swap.hset(self._meta, mapping={"version": version, **{k: str(v) for k, v in (meta or {}).items()}})
                    swap.expire(self._meta, ttl_s)
                    swap.execute()
                    break
                except redis.WatchError:  # another run swapped first: recompute what is stale
                    continue
        log.info("published %d trending lists (version %s)", len(live), version)

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.client.smembers(self._names))

    def version(self) -> str | None:
        value = self.client.hget(self._meta, "version")
        return value.decode() if value else None

    def top(self, name: str, k: int, genre: str | None = None) -> list[dict]:
        """The first k tracks of a list, best first, with their details. `genre` filters the
        list (a locale's list narrowed to one genre); one round trip either way. The two reads
        go in one MULTI: a swap landing between them would pair one run's ranks with the other
        run's details."""
        span = -1 if genre else k - 1
        pipe = self.client.pipeline(transaction=True)
        pipe.zrevrange(self._list(name), 0, span, withscores=True)
        pipe.hgetall(self._detail(name))
        ranked, details = pipe.execute()
        out = []
        for member, rank_score in ranked:
            detail = json.loads(details.get(member, b"{}"))
            if genre and detail.get("genre") != genre:
                continue
            out.append({"track_id": member.decode(), "rank_score": float(rank_score), **detail})
            if len(out) == k:
                break
        return out


def _detail(row: dict) -> dict:
    out = {}
    for field in DETAIL_FIELDS:
        value = row.get(field)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out[field] = float(value) if field not in ("genre", "artist_id") else str(value)
    return out
