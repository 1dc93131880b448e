"""The stream's consumer group: online updates applied exactly once, retries, dead letters.

Each consumer reads new entries with XREADGROUP and first claims entries a dead consumer left
pending (XAUTOCLAIM after `claim_idle_ms`). The online updates serving needs (a user's recent
plays, per-track counters) are applied by one Lua script that applies an entry only while it
is still pending and acknowledges it in the same atomic step: so a consumer killed mid-batch
has applied nothing it did not acknowledge, and two consumers racing for the same entry apply
it once. Transient failures (Redis errors, `TransientError`) are retried with
exponential backoff and full jitter; after `max_attempts`, or an entry delivered
`max_deliveries` times, the entry goes to the dead-letter stream with the reason, attempt
count, stage and original payload, and is acknowledged. Nothing is dropped silently.
Redis refusing writes for a while (maxmemory, a read-only replica in a failover, a busy
script: app/events/redis_errors.py) is not the entries' fault: they stay pending with this
consumer, `poll` raises `RedisRefused` and retries them first next time, and none is
dead-lettered (which would only grow a Redis that is already full).

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
from app.events.redis_errors import is_refusal
from app.events.stream import StreamEntry, decode_entry
from app.keys import Keys

log = logging.getLogger(__name__)

SOURCE = "consume_events"


class TransientError(RuntimeError):
    """A failure that may pass on retry (a stage raises it for a flaky dependency)."""


TRANSIENT = (redis.ConnectionError, redis.TimeoutError, TransientError)


class RedisRefused(redis.RedisError):
    """Redis kept refusing the stage's writes (OOM, READONLY, BUSY) through every attempt: the
    batch is left pending, held by this consumer for its next poll."""


# KEYS[1] = the stream (mode ack) or the dead-letter stream (mode replay).
# ARGV = mode, group, recent-plays prefix, track-counter prefix, recent plays kept, then per
# entry: id, user_id, track_id, event_type. An entry is applied only while it is still pending
# in the group (or, replaying, still in the dead-letter stream), and acknowledged (or deleted)
# right after: one caller applies it, once. Key types are checked before any write of an entry,
# so a bad entry leaves nothing half-applied (Lua does not roll back), stays pending and is
# reported back: {applied, id, reason, id, reason, ...}. The keys built from the prefixes share
# the streams' `{events}` hash tag (app/keys.py): one slot on a Redis Cluster.
_APPLY = """
local mode, group, rprefix, tprefix, keep = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local out = {0}
for i = 6, #ARGV, 4 do
  local id, user, track, etype = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local live
  if mode == 'ack' then
    live = #redis.call('XPENDING', KEYS[1], group, id, id, 1) > 0
  else
    live = #redis.call('XRANGE', KEYS[1], id, id) > 0
  end
  if live then
    local tkey, rkey = tprefix .. track, rprefix .. user
    local ttype, rtype = redis.call('TYPE', tkey).ok, redis.call('TYPE', rkey).ok
    if (ttype ~= 'none' and ttype ~= 'hash') or (rtype ~= 'none' and rtype ~= 'list') then
      out[#out + 1] = id
      out[#out + 1] = 'WRONGTYPE: online keys hold ' .. ttype .. '/' .. rtype
    else
      redis.call('HINCRBY', tkey, etype, 1)
      if etype == 'play' then
        redis.call('LPUSH', rkey, track)
        redis.call('LTRIM', rkey, 0, keep - 1)
      end
      if mode == 'ack' then redis.call('XACK', KEYS[1], group, id) else redis.call('XDEL', KEYS[1], id) end
      out[1] = out[1] + 1
    end
  end
end
return out
"""


# KEYS = stream, dead-letter stream; ARGV = group, entry id, then the dead letter's field pairs.
# Dead-letters only if this acknowledgement removed the entry from the pending list: had another
# consumer claimed and applied it meanwhile, a dead letter would be replayed into a double count.
_DEAD_LETTER = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
  return 1
end
return 0
"""


@dataclass
class Applied:
    count: int
    """Entries applied and acknowledged by this call."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Entry id -> why it cannot be applied (retrying will not help); left pending."""


class Stage(Protocol):
    name: str

    def apply(self, entries: list[StreamEntry]) -> Applied:
        """Apply and acknowledge each entry atomically with its acknowledgement."""


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

    @staticmethod
    def _result(reply: list) -> Applied:
        pairs = reply[1:]
        return Applied(int(reply[0]), {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs), 2)})

    def apply(self, entries: list[StreamEntry]) -> Applied:
        return self._result(self._apply(keys=[self.stream_key], args=self._argv("ack", [(e.id, e.event) for e in entries])))

    def apply_dead_letter(self, dlq_key: str, dead_letter_id: str, event: dict) -> Applied:
        """Replay one dead letter: apply it and delete it, atomically (count 0 if already gone)."""
        return self._result(self._apply(keys=[dlq_key], args=self._argv("replay", [(dead_letter_id, event)])))


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
        self._dead_letter_script = client.register_script(_DEAD_LETTER)
        self._held: list[StreamEntry] = []
        """Entries Redis refused to update for: retried before anything else is read."""

    def ensure_group(self) -> None:
        """Create the group at the start of the stream (idempotent)."""
        try:
            self.client.xgroup_create(self.stream_key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def poll(self, block_ms: int | None = None) -> int:
        """Handle one batch: entries Redis refused last time first, then stale pending ones, else
        new ones. Returns entries handled; raises RedisRefused while Redis refuses writes."""
        if self._held:
            held, self._held = self._held, []
            return self.handle(held)
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
            try:
                self._apply_with_retries(good)
            except RedisRefused:
                self._hold(good)
                raise
        return len(entries)

    def _hold(self, entries: list[StreamEntry]) -> None:
        """Keep refused entries for the next poll. XCLAIM JUSTID marks them as just handled
        without counting a delivery, so while this consumer lives no other claims them as stale
        and a long refusal does not turn them into poison (entries already applied or
        dead-lettered are no longer pending: XCLAIM skips them, and the apply script would too)."""
        self._held = entries
        try:
            self.client.xclaim(self.stream_key, self.group, self.name, 0, [e.id for e in entries], justid=True)
        except redis.RedisError as exc:  # the entries stay pending either way
            log.warning("%s: could not mark %d held entries as in hand: %s", self.name, len(entries), exc)

    def _apply_with_retries(self, entries: list[StreamEntry]) -> None:
        failure = self._attempt(entries)
        if failure is None:
            return
        reason, attempts, permanent = failure
        if permanent and len(entries) > 1:
            # One bad entry fails the whole script; entries before it were applied and acked
            # (the XACK gate makes redoing them a no-op), so isolate the culprit one by one.
            for entry in entries:
                self._apply_with_retries([entry])
            return
        for entry in entries:
            self._dead_letter(entry, reason, self.stage.name, attempts)

    def _attempt(self, entries: list[StreamEntry]) -> tuple[str, int, bool] | None:
        """None on success, else (reason, attempts made, whether retrying could not help)."""
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                result = self.stage.apply(entries)
                self.stats.applied += result.count
                for entry in entries:
                    if entry.id in result.rejected:
                        self._dead_letter(entry, result.rejected[entry.id], self.stage.name, attempt)
                return None
            except Exception as exc:
                refused = is_refusal(exc)
                if not refused and not isinstance(exc, TRANSIENT):  # bad data or a bug: dead-lettered with the reason
                    return f"{type(exc).__name__}: {exc}", attempt, True
                last = f"{type(exc).__name__}: {exc}"
                if attempt < attempts:
                    self.stats.retries += 1
                    delay = backoff_delay(attempt, self.settings.backoff_base_s, self.settings.backoff_max_s, self.rng)
                    log.warning("%s: %s failed (attempt %d/%d), retrying in %.3fs: %s", self.name, self.stage.name, attempt, attempts, delay, last)
                    self.sleep(delay)
                elif refused:
                    raise RedisRefused(f"{self.stage.name}: Redis refused writes {attempts} times, entries left pending: {last}") from exc
        return last, attempts, False

    def _dead_letter(self, entry: StreamEntry, reason: str, stage: str, attempts: int) -> None:
        """Acknowledge and dead-letter in one atomic step: the entry is in exactly one place."""
        fields = DeadLetterQueue.entry(SOURCE, entry.raw.decode(errors="replace"), reason, stage, attempts, entry.id)
        argv = [self.group, entry.id, *(x for kv in fields.items() for x in kv)]
        if not self._dead_letter_script(keys=[self.stream_key, self.dlq.key], args=argv):
            log.info("%s: %s was acknowledged by another consumer meanwhile; not dead-lettered", self.name, entry.id)
            return
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
