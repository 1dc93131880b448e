"""Every Redis key EchoTune uses, in one place, under one configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "echotune"

    def dedup(self) -> str:
        """Prefix of the per-event idempotency markers."""
        return f"{self.prefix}:seen-event:"

    def export_cursor(self) -> str:
        return f"{self.prefix}:export:cursor"

    def feature_alias(self) -> str:
        """Names the feature namespace (materialisation version) readers should use."""
        return f"{self.prefix}:fs:current"

    def feature_hash(self, namespace: str, view: str, entity_id: str) -> str:
        return f"{self.prefix}:fs:{namespace}:{view}:{entity_id}"

    def namespace_pattern(self, namespace: str) -> str:
        """SCAN pattern matching every key of one feature namespace."""
        return f"{self.prefix}:fs:{namespace}:*"

    def ranking(self, namespace: str, name: str) -> str:
        """Sorted set of a ranked list (trending, popular) inside a feature namespace."""
        return f"{self.prefix}:fs:{namespace}:rank:{name}"

    def api_key(self, key_id: str) -> str:
        """Hash of one API key's record: salt, salted hash, scopes. Never the key itself."""
        return f"{self.prefix}:apikey:{key_id}"

    def api_key_pattern(self) -> str:
        return f"{self.prefix}:apikey:*"

    def rate_bucket(self, key_id: str, scope: str) -> str:
        """Token bucket of one API key under one scope."""
        return f"{self.prefix}:ratelimit:{key_id}:{scope}"

    def session_state(self) -> str:
        """Prefix of the per-user sessionisation state (current session id, last event time)."""
        return f"{self.prefix}:session:"

    def recent_plays(self, user_id: str) -> str:
        """Online list of a user's most recent plays, newest first (the consumer keeps it)."""
        return f"{self.prefix}:online:recent:{user_id}"

    def user_prefs(self, user_id: str) -> str:
        """Hash of a listener's content settings: explicit allowed, blocked tracks and artists."""
        return f"{self.prefix}:prefs:{user_id}"

    def track_counters(self, track_id: str) -> str:
        """Online hash of a track's event counts by event type (the consumer keeps it)."""
        return f"{self.prefix}:online:track:{track_id}"

    def export_inflight(self) -> str:
        """Id range of the chunk being exported; a re-run after a crash redoes exactly it."""
        return f"{self.prefix}:export:inflight"

    def push_subscriptions(self, user_id: str) -> str:
        """Hash of a listener's web-push subscriptions: endpoint digest -> subscription JSON."""
        return f"{self.prefix}:push:subs:{user_id}"

    def push_sequence(self, user_id: str) -> str:
        """Counter ordering a listener's device subscriptions (the oldest is replaced first)."""
        return f"{self.prefix}:push:seq:{user_id}"

    def push_profile(self, user_id: str) -> str:
        """Hash of a listener's push preferences: time zone, genres."""
        return f"{self.prefix}:push:profile:{user_id}"

    def push_users(self) -> str:
        """Set of listeners with at least one push subscription (what `jobs.notify` walks)."""
        return f"{self.prefix}:push:users"

    def push_sent(self, user_id: str) -> str:
        """Sorted set of a listener's notification times (ms): the frequency cap's memory."""
        return f"{self.prefix}:push:sent:{user_id}"

    def push_announced(self, user_id: str) -> str:
        """Set of tracks a listener was already told about, so each trend is news once."""
        return f"{self.prefix}:push:announced:{user_id}"

    def experiments(self) -> str:
        """Hash of experiment definitions (name -> JSON), status and bucket range included."""
        return f"{self.prefix}:exp:definitions"

    def experiment_kills(self) -> str:
        """Hash of killed variants ("experiment/variant" -> why): the rollback kill switch."""
        return f"{self.prefix}:exp:killed"
