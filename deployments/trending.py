"""Trending: serves the lists the trending job swaps into Redis (GET /v1/trending)."""

from __future__ import annotations

from ray import serve

from app.config import Settings
from app.redis_server import connect
from app.trending.lists import TrendingLists, list_name


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Trending:
    def __init__(self, settings: Settings):
        self.client = connect(settings)
        self.lists = TrendingLists(self.client, settings.redis.key_prefix)

    def top(self, genre: str | None, locale: str | None, k: int) -> dict:
        """A locale with a genre is the locale's list narrowed to that genre."""
        name = list_name(genre, locale)
        items = self.lists.top(name, k, genre=genre if locale else None)
        return {"list": name, "version": self.lists.version(), "items": items}

    def check_health(self) -> None:
        self.client.ping()
