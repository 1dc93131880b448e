"""Serving-side feature reads that survive a Redis outage.

Every successful read also lands in a bounded in-process snapshot (LRU by entity, plus the
latest ranked lists). When Redis is unreachable the reader answers from that snapshot and
flags the result stale, so a request degrades instead of failing: a user read recently still
gets their features, anyone else gets the cold-start path with the cached popular list. The
live reads (recent plays, preferences) and the alias's metadata are kept too: an outage must
not bring back a track the listener blocked or just heard. A live read the snapshot never saw
comes back as None, not as empty, so the caller can tell "no preferences" from "unknown".

After a failed read the reader does not try Redis again for `retry_s` (a circuit breaker):
a Redis that hangs rather than refuses costs a whole socket timeout per attempt, and the
serving replicas read on their event loop, so one attempt per interval, not one per request.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import redis

from app.features.store import LiveRead, OnlineStore, Published

log = logging.getLogger(__name__)


@dataclass
class FeatureRead:
    rows: list[dict[str, Any] | None]
    rankings: list[list[tuple[str, float]]]
    namespace: str | None
    live: list = field(default_factory=list)
    stale: bool = False
    meta: dict = field(default_factory=dict)


class FeatureReader:
    def __init__(self, store: OnlineStore, refresh_s: float, max_entries: int, clock=time.monotonic, retry_s: float = 1.0):
        self.store = store
        self.refresh_s = refresh_s
        self.max_entries = max_entries
        self.clock = clock
        self.retry_s = retry_s
        self._down_until = -float("inf")
        self._published: Published | None = None
        self._checked = -float("inf")
        self._rows: OrderedDict[tuple[str, str], dict[str, Any] | None] = OrderedDict()
        self._rankings: dict[str, list[tuple[str, float]]] = {}

    def _current(self) -> Published | None:
        # The alias moves once per materialisation; re-reading it every `refresh_s` keeps a
        # steady-state read at one round trip.
        if self._published is None or self.clock() - self._checked >= self.refresh_s:
            self._read_alias()
        return self._published

    def _read_alias(self) -> None:
        published = self.store.current()
        self._published, self._checked = published, self.clock()

    def refresh(self) -> None:
        """Re-reads the alias now: a replica calls this from a BackgroundRefresh
        (app/refresh.py) and builds the reader with `refresh_s=inf`, so a read never waits
        for it. Unreachable, the alias read before stays in use and the breaker opens as a
        failed read would open it; reachable, it closes the breaker (Redis is back)."""
        try:
            self._read_alias()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("online store unreachable, keeping the feature alias read before: %s", exc)
            self._down_until = self.clock() + self.retry_s
            return
        self._down_until = -float("inf")

    def read(
        self, requests: list[tuple[str, str]], rankings: list[tuple[str, int]] = (), live: list[LiveRead] = ()
    ) -> FeatureRead:
        """`requests` are (view name, entity id); `rankings` are (name, top n); `live` are
        un-versioned reads (recent plays, preferences) done in the same round trip."""
        if self.clock() < self._down_until:
            return self._from_snapshot(requests, rankings, live)
        try:
            published = self._current()
            if published is None:
                return FeatureRead([None] * len(requests), [[] for _ in rankings], None, self._empty_live(live))
            views = [(published.registry[name], entity) for name, entity in requests]
            result = self.store.read(published.namespace, views, rankings, live)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("online store unreachable, serving the local snapshot for %.1f s: %s", self.retry_s, exc)
            self._down_until = self.clock() + self.retry_s
            return self._from_snapshot(requests, rankings, live)
        self._remember(requests, result.rows, rankings, result.rankings, live, result.live)
        return FeatureRead(result.rows, result.rankings, published.namespace, result.live, meta=published.meta)

    @staticmethod
    def _empty_live(live) -> list:
        return [[] if item.kind == "list" else {} for item in live]

    def _remember(self, requests, rows, rankings, ranked, live, live_values) -> None:
        for key, row in [*zip(requests, rows), *((("live", item.key), value) for item, value in zip(live, live_values))]:
            self._rows[key] = row
            self._rows.move_to_end(key)
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)
        for (name, _), items in zip(rankings, ranked):
            self._rankings[name] = items

    def _from_snapshot(self, requests, rankings, live) -> FeatureRead:
        rows = [self._rows.get(key) for key in requests]
        ranked = [self._rankings.get(name, [])[:n] for name, n in rankings]
        remembered = [self._rows.get(("live", item.key)) for item in live]
        namespace, meta = (self._published.namespace, self._published.meta) if self._published else (None, {})
        return FeatureRead(rows, ranked, namespace, [v[: item.n] if isinstance(v, list) else v for item, v in zip(live, remembered)],
                           stale=True, meta=meta)
