"""FeatureFetcher: everything serving needs about a batch of users in one Redis round trip: the
materialised profile, the plays the event consumer recorded since training (for the fold-in)
and the listener's content preferences.

When Redis is unreachable it answers from its bounded local snapshot, flagged stale, so the
request degrades instead of failing; `check_health` still reports the outage to Serve.

`fetch` is `async` though its read blocks: one pipelined round trip for the whole batch, well
under a millisecond, runs on the replica's loop for less than Serve's hand-off of a plain
method to a worker thread and back costs (the A/B in deployments/ranking.py). During an outage
the reader's breaker (features.outage_retry_s) bounds how often a hung Redis can block it.
"""

from __future__ import annotations

from ray import serve

from app.config import Settings
from app.features.reader import FeatureReader
from app.features.store import LiveRead, RedisOnlineStore
from app.keys import Keys
from app.prefs import prefs_or_safe
from app.recommend import UserFeatures, user_features_from_row
from app.redis_server import connect
from deployments.metrics import keep_fresh, observe_latency
from deployments.packed import Packed, pack


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class FeatureFetcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = Keys(settings.redis.key_prefix)
        self.client = connect(settings)
        self.reader = FeatureReader(
            RedisOnlineStore(self.client, self.keys),
            refresh_s=float("inf"),  # the alias is re-read by the background thread below
            max_entries=settings.features.snapshot_entries,
            retry_s=settings.features.outage_retry_s,
        )
        self.refresher = keep_fresh(self.reader.refresh, settings.serving.reload_interval_s, "FeatureFetcher")

    @observe_latency("feature_fetch", "FeatureFetcher")
    async def fetch(self, user_ids: list[str]) -> Packed[list[UserFeatures]]:
        """A batch of users' own features in one round trip. The trending and popular lists
        are the same for everyone, so the Blender keeps them cached instead of every request
        carrying them along."""
        # The consumer's whole list, not only the `serving.recent_plays` the content seeds use:
        # every play since the last materialisation must be excluded as heard, and a listener
        # can easily play more than 20 tracks between two.
        n_recent = max(self.settings.serving.recent_plays, self.settings.consumer.recent_plays, 1)
        live = []
        for user_id in user_ids:
            live.append(LiveRead("list", self.keys.recent_plays(user_id), n_recent))
            live.append(LiveRead("hash", self.keys.user_prefs(user_id)))
        read = self.reader.read([("user_profile", u) for u in user_ids], live=live)
        cf_version = read.meta.get("artifacts", {}).get("cf")
        return pack([
            user_features_from_row(
                user_id, row, [], [], read.namespace,
                stale=read.stale, online_recent=recent, prefs=prefs_or_safe(prefs), cf_version=cf_version,
            )
            for user_id, row, recent, prefs in zip(user_ids, read.rows, read.live[0::2], read.live[1::2])
        ])

    def check_health(self) -> None:
        self.client.ping()
