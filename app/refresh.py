"""Periodic reloads beside the request path rather than inside it.

A serving replica keeps things that change rarely: the model bundle, the feature alias, the
trending and popular lists, the experiment definitions. Checked inline, the first request
after each interval pays the check (a Redis round trip or a few stat calls) and the first
request after a publish pays the whole reload, while every other request on that replica's
event loop waits behind it. A `BackgroundRefresh` does that work on a daemon thread instead:
requests read whatever was loaded last, and a reload swaps one reference when it is done.

The caches keep their inline check for callers without a thread (jobs, tests); a replica
builds them with `interval_s=inf`, so the request path only ever loads what was never
loaded, and hands their `refresh` to a `BackgroundRefresh`.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class BackgroundRefresh:
    """Calls `refresh` every `interval_s` seconds on a daemon thread until `stop()`.

    A failing refresh is logged and tried again at the next tick; the caller keeps serving
    what it loaded before (each cache decides what a failure means, e.g. the experiment
    cache fails closed)."""

    def __init__(self, refresh: Callable[[], None], interval_s: float, name: str, on_failure: Callable[[str], None] | None = None):
        """`on_failure(name)` is told of every failed refresh (a replica counts them in a
        metric: a reload that keeps failing means the replica serves old models)."""
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.refresh = refresh
        self.interval_s = interval_s
        self.name = name
        self.on_failure = on_failure
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"echotune-refresh-{name}", daemon=True)

    def start(self) -> "BackgroundRefresh":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def refresh_now(self) -> bool:
        """One refresh on the caller's thread, its failure handled as a tick's is; whether it
        worked. A replica's first refresh: it starts even if that fails (Redis down, an
        artifact half written), serving what it can until a tick succeeds."""
        try:
            self.refresh()
        except Exception:  # noqa: BLE001 - logged and counted; the next tick tries again
            self.failures += 1
            log.exception("background refresh %s failed; serving what was loaded before", self.name)
            self._tell_failure()
            return False
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh_now()

    def _tell_failure(self) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(self.name)
        except Exception:  # noqa: BLE001 - a metric that cannot be recorded must not end the refreshing
            log.exception("could not record the failure of background refresh %s", self.name)
