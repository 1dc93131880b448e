"""Listener preferences that filter recommendations: explicit content, hidden tracks, blocked
artists. Kept in a Redis hash per user so serving reads them in its one round trip."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from pydantic import BaseModel, ConfigDict, Field

from app.keys import Keys
from app.wire import ID_SEPARATOR as SEP


@dataclass
class UserPrefs:
    """Per-listener settings that filter what may be shown."""

    allow_explicit: bool = True
    blocked_tracks: set[str] = field(default_factory=set)
    blocked_artists: set[str] = field(default_factory=set)


class PreferencesUpdate(BaseModel):
    """Body of PUT /v1/users/{user_id}/preferences; omitted fields keep their value."""

    model_config = ConfigDict(extra="forbid")

    allow_explicit: bool | None = None
    blocked_tracks: list[str] | None = Field(None, max_length=10_000)
    blocked_artists: list[str] | None = Field(None, max_length=10_000)


def prefs_from_hash(raw: dict[str, str]) -> UserPrefs:
    split = lambda v: set(v.split(SEP)) if v else set()  # noqa: E731
    return UserPrefs(
        allow_explicit=raw.get("allow_explicit", "1") == "1",
        blocked_tracks=split(raw.get("blocked_tracks", "")),
        blocked_artists=split(raw.get("blocked_artists", "")),
    )


def prefs_or_safe(raw: dict[str, str] | None) -> UserPrefs:
    """The listener's preferences, or the safe side when they could not be read (Redis down
    and the replica's snapshot never saw them): no explicit content. A listener who allows it
    goes without for the outage; one who opted out is not shown it."""
    return UserPrefs(allow_explicit=False) if raw is None else prefs_from_hash(raw)


class PreferencesStore:
    def __init__(self, client: redis.Redis, keys: Keys):
        self.client = client
        self.keys = keys

    def update(self, user_id: str, update: PreferencesUpdate) -> UserPrefs:
        mapping: dict[str, str] = {}
        if update.allow_explicit is not None:
            mapping["allow_explicit"] = "1" if update.allow_explicit else "0"
        for name in ("blocked_tracks", "blocked_artists"):
            values = getattr(update, name)
            if values is not None:
                mapping[name] = SEP.join(v for v in values if SEP not in v)
        if mapping:
            self.client.hset(self.keys.user_prefs(user_id), mapping=mapping)
        return self.get(user_id)

    def get(self, user_id: str) -> UserPrefs:
        raw = self.client.hgetall(self.keys.user_prefs(user_id))
        return prefs_from_hash({k.decode(): v.decode() for k, v in raw.items()})
