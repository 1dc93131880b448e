"""FeatureFetcher: a user's online features plus the ranked lists, in one Redis round trip."""

from __future__ import annotations

import time

from ray import serve

from app.config import Settings
from app.features.store import RedisOnlineStore
from app.features.views import USER_PROFILE
from app.keys import Keys
from app.recommend import UserFeatures, user_features_from_row
from app.redis_server import connect


@serve.deployment(ray_actor_options={"num_cpus": 0})
class FeatureFetcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = connect(settings)
        self.store = RedisOnlineStore(self.client, Keys(settings.redis.key_prefix))
        self._namespace: str | None = None
        self._namespace_checked = -float("inf")

    def _current_namespace(self) -> str | None:
        # The alias changes once per materialisation; caching it keeps reads to one round trip.
        now = time.monotonic()
        if self._namespace is None or now - self._namespace_checked > self.settings.serving.reload_interval_s:
            self._namespace = self.store.current_namespace()
            self._namespace_checked = now
        return self._namespace

    def fetch(self, user_id: str) -> UserFeatures:
        namespace = self._current_namespace()
        if namespace is None:
            return UserFeatures(user_id, known=False)
        n = self.settings.serving.candidates
        (row,), (trending, popular) = self.store.read(
            namespace, [(USER_PROFILE, user_id)], rankings=[("trending", n), ("popular", n)]
        )
        return user_features_from_row(user_id, row, trending, popular, namespace)

    def check_health(self) -> None:
        self.client.ping()
