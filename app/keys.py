"""Every Redis key EchoTune uses, in one place, under one configurable prefix.

Key design for Redis Cluster (`redis.url: redis+cluster://...`): a cluster spreads keys over
16384 hash slots by CRC16 of the key, or of its *hash tag* (the text between the first `{`
and the next `}`). Non-transactional pipelines may span slots (redis-py's cluster pipeline
splits them by node), so keys read or written together in one pipeline (entity rows) and
keys used one at a time (rate buckets, API keys) stay untagged and spread over the cluster. Only what must run atomically on one
node shares a tag:

- `{events}`: the ingest path. The append script (dedup buckets + session state + XADD) and the
  consumer's apply script (pending check + recent plays + track counters + XACK) touch keys
  derived from prefixes inside one Lua call, and the dead-letter script XACKs the stream and
  XADDs the dead-letter stream. So the stream, the dead-letter stream and these keys live in
  one slot; on a cluster `redis.stream_key` and `redis.dead_letter_key` must carry the
  `{events}` tag too (settings validation says so). Throughput is bounded by one stream on one
  node anyway; scaling ingest past it means several streams, each with its own tag.
- `{export}`: the export cursor, the in-flight range and the export lock: the commit script
  checks the lock and moves the cursor in one step.
- `{trending}` (app/trending/lists.py): every published list, swapped by RENAME in one MULTI.
- `{<user_id>}` per listener for push: a device's subscription and the listener's profile are
  stored in one MULTI.

Single-key atomics need no tag: the rate limiter's Lua bucket, the feature alias (one SET
swaps a materialisation in), a ranking's DEL+ZADD MULTI. On a single server tags are inert;
`legacy_renames` maps the names an older EchoTune used there onto these
(`echotune redis migrate-keys`, run by `make demo` on its embedded server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

INGEST_TAG = "events"
"""Hash tag of every key the ingest scripts touch (see the module docstring)."""


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes for `key`: the first non-empty `{...}`, else the whole key."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


@dataclass(frozen=True)
class Keys:
    prefix: str = "echotune"

    def dedup(self) -> str:
        """Prefix of the idempotency marker hashes, one per bucket of arrival time
        (app/events/stream.py)."""
        return f"{self.prefix}:{{{INGEST_TAG}}}:dedup:"

    def legacy_dedup_markers(self) -> list[str]:
        """SCAN patterns of the one-key-per-event markers older EchoTunes wrote (untagged,
        then tagged); `echotune redis migrate-keys` folds them into the current bucket."""
        return [f"{self.prefix}:seen-event:*", f"{self.prefix}:{{{INGEST_TAG}}}:seen-event:*"]

    def export_cursor(self) -> str:
        return f"{self.prefix}:{{export}}:cursor"

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
        return f"{self.prefix}:{{{INGEST_TAG}}}:session:"

    def recent_plays(self, user_id: str) -> str:
        """Online list of a user's most recent plays, newest first (the consumer keeps it)."""
        return f"{self.prefix}:{{{INGEST_TAG}}}:recent:{user_id}"

    def user_prefs(self, user_id: str) -> str:
        """Hash of a listener's content settings: explicit allowed, blocked tracks and artists."""
        return f"{self.prefix}:prefs:{user_id}"

    def track_counters(self, track_id: str) -> str:
        """Online hash of a track's event counts by event type (the consumer keeps it)."""
        return f"{self.prefix}:{{{INGEST_TAG}}}:track:{track_id}"

    def export_lock(self) -> str:
        """Held by the export run in progress (jobs/export_events.py): one run at a time."""
        return f"{self.prefix}:{{export}}:lock"

    def export_inflight(self) -> str:
        """Id range of the chunk being exported; a re-run after a crash redoes exactly it."""
        return f"{self.prefix}:{{export}}:inflight"

    def push_subscriptions(self, user_id: str) -> str:
        """Hash of a listener's web-push subscriptions: endpoint digest -> subscription JSON."""
        return f"{self.prefix}:push:{{{user_id}}}:subs"

    def push_sequence(self, user_id: str) -> str:
        """Counter ordering a listener's device subscriptions (the oldest is replaced first)."""
        return f"{self.prefix}:push:{{{user_id}}}:seq"

    def push_profile(self, user_id: str) -> str:
        """Hash of a listener's push preferences: time zone, genres."""
        return f"{self.prefix}:push:{{{user_id}}}:profile"

    def push_users(self) -> str:
        """Set of listeners with at least one push subscription (what `jobs.notify` walks)."""
        return f"{self.prefix}:push:users"

    def push_sent(self, user_id: str) -> str:
        """Sorted set of a listener's notification times (ms): the frequency cap's memory."""
        return f"{self.prefix}:push:{{{user_id}}}:sent"

    def push_announced(self, user_id: str) -> str:
        """Set of tracks a listener was already told about, so each trend is news once."""
        return f"{self.prefix}:push:{{{user_id}}}:announced"

    def experiments(self) -> str:
        """Hash of experiment definitions (name -> JSON), status and bucket range included."""
        return f"{self.prefix}:exp:definitions"

    def experiment_kills(self) -> str:
        """Hash of killed variants ("experiment/variant" -> why): the rollback kill switch."""
        return f"{self.prefix}:exp:killed"

    def legacy_renames(self) -> list[tuple[str, Callable[[str], str]]]:
        """(SCAN pattern, old name -> new name) for keys an older EchoTune wrote without hash
        tags, so a server upgraded in place keeps its subscriptions, counters and cursor."""

        def under(old: str, new: Callable[[str], str]) -> tuple[str, Callable[[str], str]]:
            return f"{old}*", lambda name: new(name[len(old):])

        p = self.prefix
        return [
            under(f"{p}:session:", lambda rest: self.session_state() + rest),
            under(f"{p}:online:recent:", self.recent_plays),
            under(f"{p}:online:track:", self.track_counters),
            (f"{p}:export:cursor", lambda _: self.export_cursor()),
            (f"{p}:export:inflight", lambda _: self.export_inflight()),
            under(f"{p}:push:subs:", self.push_subscriptions),
            under(f"{p}:push:seq:", self.push_sequence),
            under(f"{p}:push:profile:", self.push_profile),
            under(f"{p}:push:sent:", self.push_sent),
            under(f"{p}:push:announced:", self.push_announced),
        ]
