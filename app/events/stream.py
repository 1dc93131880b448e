"""The durable event log: a Redis Stream with idempotent appends.

Every accepted event is one stream entry holding its JSON. Appends go through one Lua script
so that "first time we see this event_id → sessionise and XADD, else report a duplicate" is
atomic even with several gateway replicas: a client retrying after a timeout never
double-counts, and the gateway acknowledges only what the script put in the stream.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable, Iterator

import redis

from app.config import Settings
from app.keys import Keys

log = logging.getLogger(__name__)

# KEYS[1] = stream. ARGV[1..6] = dedup bucket prefix, bucket length (ms), dedup window (ms),
# session prefix, session gap (ms), session state ttl (s); then per event: event_id (16 UUID
# bytes), fingerprint (8 bytes), user_id, timestamp ms, and the event's JSON without its closing
# brace (the script appends the session id and the brace).
# Returns per event a (status, stream id) pair: 1 accepted, 0 duplicate, -1 id reused for a
# different event. Dedup, sessionisation and XADD are one atomic step: a retried event never
# moves a session, and two replicas never both accept the same id. The keys built from the
# prefixes share the stream's `{events}` hash tag (app/keys.py): one slot on a Redis Cluster.
#
# Dedup markers live in hashes, one per bucket of arrival time on Redis's own clock (one clock
# for every gateway replica, so no skew can hide a marker): an event is a duplicate if any
# bucket still covering the window holds its id. A bucket expires one window after it closes,
# so an id is remembered for at least the window and at most a bucket longer. Compared with one
# key per event (213 bytes each measured, key object plus expiry entry), a binary hash field
# costs 85: the window's memory is what bounds Redis under sustained ingest.
_APPEND = """
local out = {}
local dprefix, bucket, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local sprefix, gap, sttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local newest = math.floor(now / bucket)
local oldest = math.floor((now - window) / bucket)
local current = dprefix .. string.format('%.0f', newest)
local added = false
local late = {}  -- per user: the late sessions this call started, {sid, lo, hi}
local function new_session(user, ts_s)
  return string.sub(redis.sha1hex(user .. ':' .. ts_s), 1, 16)
end
for i = 7, #ARGV, 5 do
  local id, fp, user, ts_s, head = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local skey = sprefix .. user
  -- Read first: a read that fails (a session key of the wrong type) leaves nothing half-done.
  local state = redis.call('HMGET', skey, 'sid', 'last')
  local seen = false
  for b = newest, oldest, -1 do
    seen = redis.call('HGET', dprefix .. string.format('%.0f', b), id)
    if seen then break end
  end
  if seen then
    -- an empty marker (folded from an older EchoTune that kept no fingerprint) is a duplicate
    out[#out + 1] = (seen == fp or seen == '') and 0 or -1
    out[#out + 1] = ''
  else
    redis.call('HSET', current, id, fp)
    added = true
    local ts = tonumber(ts_s)
    local sid, last = state[1], tonumber(state[2])
    if sid and last and ts >= last - gap and ts <= last + gap then
      if ts > last then
        redis.call('HSET', skey, 'last', ts_s)
        redis.call('EXPIRE', skey, sttl)
      end
    elseif not last or ts > last then
      sid = new_session(user, ts_s)
      redis.call('HSET', skey, 'sid', sid, 'last', ts_s)
      redis.call('EXPIRE', skey, sttl)
    else
      -- Older than the current session (plays queued offline on one device while another
      -- played on): it joins a late session this call started within the gap of it, or starts
      -- one, without moving the state back. Sent oldest first, as the PWA sends its queue,
      -- they split exactly by the gap; out of order, two late sessions that a later event
      -- bridges stay two (their first events were already appended).
      sid = nil
      local groups = late[user] or {}
      for _, g in ipairs(groups) do
        if ts >= g.lo - gap and ts <= g.hi + gap then
          sid, g.lo, g.hi = g.sid, math.min(g.lo, ts), math.max(g.hi, ts)
          break
        end
      end
      if not sid then
        sid = new_session(user, ts_s)
        groups[#groups + 1] = {sid = sid, lo = ts, hi = ts}
        late[user] = groups
      end
    end
    out[#out + 1] = 1
    out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'e', head .. ',"session_id":"' .. sid .. '"}')
  end
end
if added then
  redis.call('PEXPIREAT', current, string.format('%.0f', (newest + 1) * bucket + window))
end
return out
"""


class AppendStatus(IntEnum):
    accepted = 1
    duplicate = 0
    conflict = -1


@dataclass(frozen=True)
class AppendResult:
    status: AppendStatus
    stream_id: str | None


@dataclass(frozen=True)
class PendingEvent:
    """An enriched event ready to append: its stored document and its client fingerprint."""

    event_id: uuid.UUID
    """Parsed once, where the event is validated; the dedup marker keys on its 16 bytes."""
    user_id: str
    timestamp_ms: int
    fingerprint: bytes
    """8 bytes of the sha1 of what the client said happened (app/events/enrichment.py)."""
    document_json: str
    """The stored JSON object (without session_id, which the append script adds)."""


@dataclass
class StreamEntry:
    id: str
    event: dict | None
    """The decoded event; None when the entry is not valid JSON (`raw` then says what it was)."""
    raw: bytes = b""


def decode_entry(entry_id: bytes | str, fields: dict) -> StreamEntry:
    raw = fields.get(b"e", b"")
    try:
        event = json.loads(raw)
    except (ValueError, TypeError):
        event = None
    if not isinstance(event, dict):
        event = None
    return StreamEntry(id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id, event=event, raw=raw)


DEDUP_BUCKETS = 4
"""Buckets per dedup window. More buckets hold the window more tightly (memory up to 1/n over
it) but cost one more HGET per event in the append script."""


def dedup_bucket_ms(window_s: float) -> int:
    return max(1, math.ceil(window_s * 1000 / DEDUP_BUCKETS))


class EventStream:
    def __init__(
        self,
        client: redis.Redis,
        key: str,
        dedup_prefix: str,
        dedup_window_s: int = 24 * 3600,
        session_prefix: str = "session:",
        session_gap_s: float = 1800.0,
    ):
        self.client = client
        self.key = key
        self.dedup_prefix = dedup_prefix
        self.dedup_window_s = dedup_window_s
        self.session_prefix = session_prefix
        self.session_gap_ms = int(session_gap_s * 1000)
        # Session state outlives the gap so late uploads from an offline client still join.
        self.session_ttl_s = max(24 * 3600, int(2 * session_gap_s))
        self._append = client.register_script(_APPEND)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> "EventStream":
        keys = Keys(settings.redis.key_prefix)
        return cls(
            client,
            settings.redis.stream_key,
            keys.dedup(),
            dedup_window_s=settings.gateway.dedup_window_s,
            session_prefix=keys.session_state(),
            session_gap_s=settings.gateway.session_gap_s,
        )

    def append(self, events: list[PendingEvent]) -> list[AppendResult]:
        """Append in one atomic call: dedup, assign sessions, XADD. Redis errors propagate, so
        the caller answers 503 and nothing is acknowledged that is not in the stream."""
        if not events:
            return []
        argv: list[str | int | bytes] = [
            self.dedup_prefix, dedup_bucket_ms(self.dedup_window_s), self.dedup_window_s * 1000,
            self.session_prefix, self.session_gap_ms, self.session_ttl_s,
        ]  # fmt: skip
        for e in events:
            argv += [e.event_id.bytes, e.fingerprint, e.user_id, e.timestamp_ms, e.document_json[:-1]]
        flat = self._append(keys=[self.key], args=argv)
        return [
            AppendResult(AppendStatus(int(flat[i])), flat[i + 1].decode() if flat[i + 1] else None)
            for i in range(0, len(flat), 2)
        ]

    READ_PAGE = 1_000
    """Entries per XRANGE. Redis builds a reply in one go and then writes it out across event
    loop turns, each waiting for the append-only file's fsync under `appendfsync always`:
    in the soak, a 20,000-entry XRANGE under 1,000 events/s of writes timed out (2 s) five
    times in a row; smaller replies need fewer of those turns."""

    def read(self, after: str = "0-0", count: int = 10_000, until: str = "+") -> list[StreamEntry]:
        """Up to `count` entries strictly after `after` and up to `until` (inclusive), oldest
        first, read in pages."""
        entries: list[StreamEntry] = []
        low = f"({after}" if after != "0-0" else "-"
        while len(entries) < count:
            page = min(self.READ_PAGE, count - len(entries))
            rows = self.client.xrange(self.key, min=low, max=until, count=page)
            entries += [decode_entry(i, f) for i, f in rows]
            if len(rows) < page:
                break
            low = f"({entries[-1].id}"
        return entries

    def iter_from(self, after: str = "0-0", chunk: int = 10_000) -> Iterator[list[StreamEntry]]:
        while True:
            entries = self.read(after, chunk)
            if not entries:
                return
            yield entries
            after = entries[-1].id

    def length(self) -> int:
        return int(self.client.xlen(self.key))


def fold_legacy_markers(client: redis.Redis, bucket_prefix: str, patterns: list[str], window_s: float) -> int:
    """Move per-event markers an older EchoTune wrote (one key each, the sha1 hex of the event,
    or "1" before fingerprints) into the current bucket, so a retry of an event accepted before
    the upgrade is still a duplicate. The bucket remembers them a whole window, which is at
    least what their own TTL had left unless the window was shortened. Works a SCAN page at a
    time, one pipeline to read the page and one to move it. Returns how many moved."""
    bucket_ms = dedup_bucket_ms(window_s)
    seconds, micros = client.time()
    newest = (seconds * 1000 + micros // 1000) // bucket_ms
    current = f"{bucket_prefix}{newest}"
    moved = 0
    for pattern in patterns:
        page: list[tuple[bytes, bytes]] = []
        for raw in client.scan_iter(match=pattern, count=1000):
            try:
                page.append((raw, uuid.UUID(raw.decode()[len(pattern) - 1 :]).bytes))
            except ValueError:
                log.warning("not folding %r: not a UUID event id", raw)
            if len(page) == 1000:
                moved += _fold_page(client, current, page)
                page = []
        moved += _fold_page(client, current, page)
    if moved:
        client.pexpireat(current, (newest + 1) * bucket_ms + int(window_s * 1000))
        log.info("folded %d per-event dedup markers into %s", moved, current)
    return moved


def _fold_page(client: redis.Redis, current: str, page: list[tuple[bytes, bytes]]) -> int:
    if not page:
        return 0
    values = client.mget([key for key, _ in page])
    pipe = client.pipeline(transaction=False)
    for (key, field), value in zip(page, values):
        pipe.hsetnx(current, field, _legacy_fingerprint(value))
        pipe.delete(key)
    pipe.execute()
    return len(page)


def _legacy_fingerprint(value: bytes | None) -> bytes:
    """Today's 8-byte fingerprint from an old marker's sha1 hex; empty ("seen, content unknown",
    a duplicate to the append script) for the older markers that held just "1"."""
    try:
        return bytes.fromhex(value.decode())[:8] if value and len(value) >= 16 else b""
    except ValueError:
        return b""


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str:
    """The smallest stream id greater than `entry_id`."""
    ms, seq = _parse_id(entry_id)
    return f"{ms}-{seq + 1}"


def trim_floor(client: redis.Redis, key: str, exported_through: str, required_groups: Iterable[str] = ()) -> str:
    """The lowest id that must stay: past what export has made durable, and past nothing a
    consumer group has not yet acknowledged (its oldest pending entry, or what it has not read).
    A group in `required_groups` (the configured consumer group) that does not exist yet will
    read the stream from its start (`StreamConsumer.ensure_group` creates it at 0), so until it
    exists nothing is trimmed."""
    floor = _parse_id(next_id(exported_through))
    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:  # no such stream
        groups = []
    names = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in groups}
    missing = sorted(set(required_groups) - names)
    if missing:
        log.warning("not trimming %s: consumer group(s) %s not created yet, they will read it from the start", key, ", ".join(missing))
        return "0-0"
    for group in groups:
        name = group["name"]
        # XPENDING after XINFO: the group's consumers may have acknowledged everything in
        # between (seen in the load soak), and then there is no oldest pending entry.
        oldest = client.xpending(key, name)["min"] if int(group["pending"]) > 0 else None
        if oldest is not None:
            keep = _parse_id(oldest.decode() if isinstance(oldest, bytes) else oldest)
        else:
            last = group["last-delivered-id"]
            keep = _parse_id(next_id(last.decode() if isinstance(last, bytes) else last))
        floor = min(floor, keep)
    return f"{floor[0]}-{floor[1]}"


def trim_exported(client: redis.Redis, key: str, exported_through: str, required_groups: Iterable[str] = ()) -> int:
    """Drop entries export has written durably and every consumer group (existing, or required
    and yet to be created) has acknowledged."""
    return int(client.xtrim(key, minid=trim_floor(client, key, exported_through, required_groups), approximate=False))
