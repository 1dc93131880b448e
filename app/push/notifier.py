""""New trending in your genres": who gets told what, once, politely.

For each subscribed listener: skip during their quiet hours and when the frequency cap is
reached; otherwise look at the top of the trending list of each of their genres, keep the
tracks they were not told about yet, and send one notification to each of their devices.
A push service answering 404 or 410 says the subscription is gone for good: it is pruned.
Other failures keep the subscription and do not count against the cap (the next run retries).
An endpoint the current check refuses (stored by an older EchoTune, or its host since dropped
from `push.endpoint_hosts`) is never sent to, and kept as a failure: a slip in that list
must not delete every listener's subscription. A listener whose turn raises is counted as
"error" and the walk goes on: users are walked in sorted order, so a crash would stop every
run at the same listener and nobody after them would ever be notified.

    notifier = TrendNotifier(store, trending_top, sender, settings.push)
    report = notifier.run()
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from app.config import PushSettings
from app.push.policy import cap_reason, in_quiet_hours
from app.push.subscriptions import DAY_MS, SubscriptionStore, endpoint_problem

log = logging.getLogger(__name__)

GONE = (404, 410)
MAX_TRACKS_IN_MESSAGE = 5  # a push payload must stay under ~4 KB once encrypted

TrendingTop = Callable[[str, int], list[dict]]
"""(genre, k) -> that genre's trending tracks, best first, each with track_id (and artist_id)."""
Sender = Callable[[dict, bytes], int]
"""(subscription, payload) -> the push service's HTTP status (0: no answer)."""


@dataclass
class NotifyReport:
    users: int = 0
    outcomes: Counter = field(default_factory=Counter)
    """Per listener: sent, quiet_hours, capped, nothing_new, no_genres, undelivered, error."""
    deliveries: int = 0
    pruned: int = 0
    failed: int = 0

    def as_dict(self) -> dict:
        return {"users": self.users, **dict(self.outcomes), "deliveries": self.deliveries, "pruned": self.pruned, "failed": self.failed}


def trend_message(news: dict[str, list[dict]]) -> dict:
    """The notification a listener sees, from {genre: new trending tracks}."""
    genres = list(news)
    tracks = [dict(t, genre=g) for g, ts in news.items() for t in ts][:MAX_TRACKS_IN_MESSAGE]
    lines = [f"{t['track_id']}" + (f" by {t['artist_id']}" if t.get("artist_id") else "") for t in tracks]
    return {
        "type": "trending",
        "title": f"New trending in {', '.join(genres[:3])}",
        "body": " · ".join(lines),
        "genres": genres,
        "tracks": [{k: t[k] for k in ("track_id", "artist_id", "genre") if t.get(k)} for t in tracks],
    }


class TrendNotifier:
    def __init__(
        self,
        store: SubscriptionStore,
        trending_top: TrendingTop,
        send: Sender,
        settings: PushSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ):
        self.store = store
        self.trending_top = trending_top
        self.send = send
        self.settings = settings
        self.clock = clock

    def run(self) -> NotifyReport:
        report = NotifyReport()
        for user in self.store.users():
            report.users += 1
            try:
                outcome = self.notify(user, report)
            except Exception:
                log.exception("notifying %s failed; going on with the next listener", user)
                outcome = "error"
            report.outcomes[outcome] += 1
        log.info("notify run: %s", report.as_dict())
        return report

    def _news(self, user: str, genres: list[str]) -> dict[str, list[dict]]:
        announced = self.store.announced(user)
        news: dict[str, list[dict]] = {}
        for genre in genres:
            fresh = [t for t in self.trending_top(genre, self.settings.trending_depth) if t["track_id"] not in announced]
            if fresh:
                news[genre] = fresh
                announced.update(t["track_id"] for t in fresh)  # one track, one genre line
        return news

    def notify(self, user: str, report: NotifyReport) -> str:
        s = self.settings
        profile = self.store.profile(user)
        now = self.clock()
        if in_quiet_hours(now, profile["timezone"], s.quiet_start_hour, s.quiet_end_hour):
            return "quiet_hours"
        now_ms = int(now.timestamp() * 1000)
        if cap_reason(self.store.sent_times_ms(user, now_ms - DAY_MS), now_ms, s.max_per_day, s.min_interval_s):
            return "capped"
        if not profile["genres"]:
            return "no_genres"
        news = self._news(user, profile["genres"])
        if not news:
            return "nothing_new"
        message = trend_message(news)
        payload = json.dumps(message).encode()
        delivered = 0
        for sub_id, record in self.store.subscriptions(user):
            problem = endpoint_problem(record["subscription"]["endpoint"], s.endpoint_hosts)
            if problem:
                report.failed += 1
                log.warning("subscription %s of %s not sent to: %s", sub_id, user, problem)
                continue
            status = self.send(record["subscription"], payload)
            if 200 <= status < 300:
                delivered += 1
            elif status in GONE:
                self.store.remove(user, sub_id)
                report.pruned += 1
                log.info("pruned subscription %s of %s (push service answered %d)", sub_id, user, status)
            else:
                report.failed += 1
                log.warning("push to %s of %s failed with status %d; kept for the next run", sub_id, user, status)
        report.deliveries += delivered
        if not delivered:
            return "undelivered"
        self.store.record_sent(user, now_ms, [t["track_id"] for t in message["tracks"]])
        return "sent"
