"""Ranked lists every request needs (trending, popular), read once per refresh interval per
replica rather than once per request: they change once per materialisation. A replica
re-reads them on a BackgroundRefresh (app/refresh.py), off the request path."""

from __future__ import annotations

import time

from app.features.reader import FeatureReader


class SharedLists:
    def __init__(self, reader: FeatureReader, names: tuple[str, ...], n: int, refresh_s: float, clock=time.monotonic):
        self.reader = reader
        self.names = names
        self.n = n
        self.refresh_s = refresh_s
        self.clock = clock
        self._lists: dict[str, list[tuple[str, float]]] = {name: [] for name in names}
        self._read_at = -float("inf")
        self.stale = False

    def get(self) -> dict[str, list[tuple[str, float]]]:
        """The latest lists; during an outage the last ones read (FeatureReader's snapshot)."""
        if self.clock() - self._read_at >= self.refresh_s:
            self.refresh()
        return self._lists

    def refresh(self) -> None:
        """Reads the lists now (a replica calls this from a BackgroundRefresh and builds the
        lists with `refresh_s=inf`)."""
        read = self.reader.read([], rankings=[(name, self.n) for name in self.names])
        self._lists = dict(zip(self.names, read.rankings))
        self.stale = read.stale
        # While stale, ask on every call: Redis coming back is noticed as soon as the
        # reader's breaker lets it try again (features.outage_retry_s).
        self._read_at = -float("inf") if read.stale else self.clock()
