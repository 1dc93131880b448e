"""FeatureFetcher: everything serving needs about a user in one Redis round trip: the
materialised profile, the plays the event consumer recorded since training (for the fold-in)
and the listener's content preferences.

When Redis is unreachable it answers from its bounded local snapshot, flagged stale, so the
request degrades instead of failing; `check_health` still reports the outage to Serve.
"""

from __future__ import annotations

from ray import serve

from app.config import Settings
from app.features.reader import FeatureReader
from app.features.store import LiveRead, RedisOnlineStore
from app.keys import Keys
from app.prefs import prefs_from_hash
from app.recommend import UserFeatures, user_features_from_row
from app.redis_server import connect
from deployments.metrics import observe_latency


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class FeatureFetcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = Keys(settings.redis.key_prefix)
        self.client = connect(settings)
        self.reader = FeatureReader(
            RedisOnlineStore(self.client, self.keys),
            refresh_s=settings.serving.reload_interval_s,
            max_entries=settings.features.snapshot_entries,
        )

    @observe_latency("feature_fetch", "FeatureFetcher")
    def fetch(self, user_id: str) -> UserFeatures:
        """The user's own features. The trending and popular lists are the same for everyone,
        so the Blender keeps them cached instead of every request carrying them along."""
        live = [
            LiveRead("list", self.keys.recent_plays(user_id), max(self.settings.serving.recent_plays, 1)),
            LiveRead("hash", self.keys.user_prefs(user_id)),
        ]
        read = self.reader.read([("user_profile", user_id)], live=live)
        (row,), (recent, prefs) = read.rows, read.live
        return user_features_from_row(
            user_id, row, [], [], read.namespace,
            stale=read.stale, online_recent=recent, prefs=prefs_from_hash(prefs),
            cf_version=read.meta.get("artifacts", {}).get("cf"),
        )

    def check_health(self) -> None:
        self.client.ping()
