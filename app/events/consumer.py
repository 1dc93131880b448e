"""The stream's consumer group: online updates applied exactly once, retries, dead letters.

Each consumer reads new entries with XREADGROUP and first claims entries a dead consumer left
pending (XAUTOCLAIM after `claim_idle_ms`). The online updates serving needs (a user's recent
plays, per-track counters) are applied by one Lua script that acknowledges each entry and
applies it only if the acknowledgement was the one that removed it from the pending list: so a
consumer killed mid-batch has applied nothing, and two consumers racing for the same entry
apply it once. Transient failures (Redis errors, `TransientError`) are retried with
exponential backoff and full jitter; after `max_attempts`, or an entry delivered
`max_deliveries` times, the entry goes to the dead-letter stream with the reason, attempt
count, stage and original payload, and is acknowledged. Nothing is dropped silently.

    consumer = StreamConsumer(client, stream_key, settings.consumer, name="c1",
                              stage=OnlineUpdates(client, Keys(prefix), group, keep=50), dlq=dlq)
    consumer.ensure_group(); consumer.poll()
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import redis

from app.config import ConsumerSettings
from app.events.dead_letter import DeadLetterQueue
from app.events.stream import StreamEntry, decode_entry
from app.keys import Keys

log = logging.getLogger(__name__)

SOURCE = "consume_events"


class TransientError(RuntimeError):
    """A failure that may pass on retry (a stage raises it for a flaky dependency)."""


TRANSIENT = (redis.ConnectionError, redis.TimeoutError, TransientError)

# KEYS[1] = the stream (mode ack) or the dead-letter stream (mode replay).
# ARGV = mode, group, recent-plays prefix, track-counter prefix, recent plays kept, then per
# entry: id, user_id, track_id, event_type. The gate (XACK, or XDEL of the dead letter) returns 1
# for exactly one caller, and only that caller applies the entry.
_APPLY = """
local mode, group, rprefix, tprefix, keep = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local applied = 0
for i = 6, #ARGV, 4 do
  local id, user, track, etype = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local gate
  if mode == 'ack' then gate = redis.call('XACK', KEYS[1], group, id) else gate = redis.call('XDEL', KEYS[1], id) end
  if gate == 1 then
    redis.call('HINCRBY', tprefix .. track, etype, 1)
    if etype == 'play' then
      redis.call('LPUSH', rprefix .. user, track)
      redis.call('LTRIM', rprefix .. user, 0, keep - 1)
    end
    applied = applied + 1
  end
end
return applied
"""


class Stage(Protocol):
    name: str

    def apply(self, entries: list[StreamEntry]) -> int:
        """Apply and acknowledge the entries atomically; return how many were applied."""


class OnlineUpdates:
    """Stage `online_updates`: a user's recent plays and per-track event counters."""

    name = "online_updates"

    def __init__(self, client: redis.Redis, keys: Keys, stream_key: str, group: str, keep: int):
        self.client = client
        self.keys = keys
        self.stream_key = stream_key
        self.group = group
        self.keep = keep
        self._apply = client.register_script(_APPLY)

    def _argv(self, mode: str, items: list[tuple[str, dict]]) -> list:
        argv: list = [mode, self.group, self.keys.recent_plays(""), self.keys.track_counters(""), self.keep]
        for entry_id, event in items:
            argv += [entry_id, event["user_id"], event["track_id"], event["event_type"]]
        return argv

    def apply(self, entries: list[StreamEntry]) -> int:
        return int(self._apply(keys=[self.stream_key], args=self._argv("ack", [(e.id, e.event) for e in entries])))

    def apply_dead_letter(self, dlq_key: str, dead_letter_id: str, event: dict) -> bool:
        """Replay one dead letter: delete it and apply it, atomically; False if already gone."""
        return bool(self._apply(keys=[dlq_key], args=self._argv("replay", [(dead_letter_id, event)])))


def decode_problem(entry: StreamEntry) -> str | None:
    if entry.event is None:
        return "entry is not a JSON object"
    missing = [f for f in ("user_id", "track_id", "event_type") if not isinstance(entry.event.get(f), str) or not entry.event.get(f)]
    return f"missing or non-string fields: {', '.join(missing)}" if missing else None


@dataclass
class ConsumerStats:
    applied: int = 0
    dead_lettered: int = 0
    retries: int = 0
    claimed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2^(attempt-1))],
    so consumers that failed together do not retry together."""
    return rng.uniform(0.0, min(max_s, base_s * (2 ** (attempt - 1))))


class StreamConsumer:
    def __init__(
        self,
        client: redis.Redis,
        stream_key: str,
        settings: ConsumerSettings,
        name: str,
        stage: Stage,
        dlq: DeadLetterQueue,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.client = client
        self.stream_key = stream_key
        self.settings = settings
        self.group = settings.group
        self.name = name
        self.stage = stage
        self.dlq = dlq
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.stats = ConsumerStats()

    def ensure_group(self) -> None:
        """Create the group at the start of the stream (idempotent)."""
        try:
            self.client.xgroup_create(self.stream_key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def poll(self, block_ms: int | None = None) -> int:
        """Handle one batch: stale pending entries first, else new ones. Returns entries handled."""
        claimed = self.claim_stale()
        if claimed:
            return self.handle(claimed)
        rows = self.client.xreadgroup(
            self.group, self.name, {self.stream_key: ">"}, count=self.settings.batch_size,
            block=self.settings.block_ms if block_ms is None else block_ms,
        )
        entries = [decode_entry(i, f) for _, batch in rows for i, f in batch if f is not None]
        return self.handle(entries) if entries else 0

    def claim_stale(self) -> list[StreamEntry]:
        """XAUTOCLAIM entries idle past `claim_idle_ms`; poison ones (delivered too often) are
        dead-lettered here instead of being handed to yet another consumer to die on."""
        reply = self.client.xautoclaim(
            self.stream_key, self.group, self.name, min_idle_time=self.settings.claim_idle_ms, start_id="0-0", count=self.settings.batch_size
        )
        rows = reply[1]
        gone = [i for i, f in rows if not f]
        if gone:  # deleted from the stream while pending: nothing left to process
            self.client.xack(self.stream_key, self.group, *gone)
        entries = [decode_entry(i, f) for i, f in rows if f]
        if not entries:
            return []
        self.stats.claimed += len(entries)
        log.info("%s claimed %d stale entries", self.name, len(entries))
        delivered = {
            (p["message_id"].decode() if isinstance(p["message_id"], bytes) else p["message_id"]): p["times_delivered"]
            for p in self.client.xpending_range(self.stream_key, self.group, min=entries[0].id, max=entries[-1].id, count=len(entries) * 2, consumername=self.name)
        }
        poison = [e for e in entries if delivered.get(e.id, 0) > self.settings.max_deliveries]
        for entry in poison:
            self._dead_letter(entry, f"delivered {delivered[entry.id]} times without success", "claim", delivered[entry.id])
        return [e for e in entries if delivered.get(e.id, 0) <= self.settings.max_deliveries]

    def handle(self, entries: list[StreamEntry]) -> int:
        good = []
        for entry in entries:
            problem = decode_problem(entry)
            if problem:
                self._dead_letter(entry, problem, "decode", 1)
            else:
                good.append(entry)
        if good:
            self._apply_with_retries(good)
        return len(entries)

    def _apply_with_retries(self, entries: list[StreamEntry]) -> None:
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                self.stats.applied += self.stage.apply(entries)
                return
            except TRANSIENT as exc:
                last = f"{type(exc).__name__}: {exc}"
                if attempt < attempts:
                    self.stats.retries += 1
                    delay = backoff_delay(attempt, self.settings.backoff_base_s, self.settings.backoff_max_s, self.rng)
                    log.warning("%s: %s failed (attempt %d/%d), retrying in %.3fs: %s", self.name, self.stage.name, attempt, attempts, delay, last)
                    self.sleep(delay)
        for entry in entries:
            self._dead_letter(entry, last, self.stage.name, attempts)

    def _dead_letter(self, entry: StreamEntry, reason: str, stage: str, attempts: int) -> None:
        """Dead-letter and acknowledge in one transaction: the entry is in exactly one place."""
        fields = DeadLetterQueue.entry(SOURCE, entry.raw.decode(errors="replace"), reason, stage, attempts, entry.id)
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.dlq.key, fields).xack(self.stream_key, self.group, entry.id).execute()
        self.stats.dead_lettered += 1
        self.stats.reasons[stage] = self.stats.reasons.get(stage, 0) + 1
        log.warning("%s dead-lettered %s at stage %s after %d attempt(s): %s", self.name, entry.id, stage, attempts, reason)

    def drain(self, idle_polls: int = 2, block_ms: int = 100) -> ConsumerStats:
        """Poll until `idle_polls` polls in a row find nothing (batch mode for jobs and tests)."""
        idle = 0
        while idle < idle_polls:
            idle = idle + 1 if self.poll(block_ms=block_ms) == 0 else 0
        return self.stats


def replayable_event(record: str) -> dict | None:
    try:
        event = json.loads(record)
    except ValueError:
        return None
    entry = StreamEntry(id="", event=event if isinstance(event, dict) else None)
    return entry.event if decode_problem(entry) is None else None
