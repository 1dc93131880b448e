"""Export the event stream to Parquet, exactly once, and trim what is safely exported.

    ray job submit --working-dir . -- python -m jobs.export_events --config ray_config.yaml

Reads the Redis Stream from the saved cursor in chunks and writes each chunk as
`events/date=YYYY-MM-DD/part-<first stream id>.parquet`. Exactly once, across crashes and
Redis restarts:
1. the chunk's id range is recorded in Redis before any file is written, so a re-run after a
   crash re-exports exactly the same range into the same file names (overwriting, not adding);
2. each file is written to a temporary name, fsynced, renamed, and its folder fsynced;
3. only then the cursor moves (and the in-flight range is cleared) in one atomic script, which
   first checks that this run still holds the export lock;
4. only then the stream is trimmed, and never past an entry a consumer group still holds or
   has not read yet; while the configured group (`consumer.group`) does not exist, not at all:
   it will be created at the start of the stream and must find every event there.
Entries that cannot be exported (not JSON, missing fields, a value the Parquet column cannot
hold) go to the dead-letter stream with stage `export`, once even when their chunk is redone
(the in-flight marker remembers them); the job carries on.

One run at a time: a run holds a lock in Redis (refreshed every chunk); a second run finds it
held and exits saying so. Redis at maxmemory: what the cursor already covers is trimmed before
anything is written, which can free enough for the run to proceed; refusals (OOM, READONLY,
BUSY) are retried like a lost connection.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis

from app.config import Settings
from app.events.dead_letter import DeadLetterQueue
from app.events.redis_errors import is_transient
from app.events.stream import EventStream, StreamEntry, trim_exported
from app.keys import Keys
from app.redis_server import connect

log = logging.getLogger(__name__)

EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("track_id", pa.string()),
        ("event_type", pa.string()),
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("received_at", pa.timestamp("ms", tz="UTC")),
        ("session_id", pa.string()),
        ("device_type", pa.string()),
        ("locale", pa.string()),
        ("duration_ms", pa.int64()),
        ("position", pa.int64()),
        ("recommendation_id", pa.string()),
        ("experiment", pa.string()),
        ("variant", pa.string()),
        ("playlist_id", pa.string()),
        ("schema_version", pa.int32()),
        ("stream_id", pa.string()),
    ]
)


REQUIRED = ("event_id", "user_id", "track_id", "event_type", "timestamp")

INT_RANGES = {"int64": (-(2**63), 2**63 - 1), "int32": (-(2**31), 2**31 - 1)}
TIMESTAMP_MS = (-62_135_596_800_000, 253_402_300_799_999)
"""Epoch milliseconds of 0001-01-01 and of the last millisecond of 9999: what a gateway event can
hold, and what names a date partition."""
_SOURCE = {"received_at": "received_at_ms"}
"""Columns whose stored field has another name (`stream_id` is the entry's own id)."""


def export_problem(entry: StreamEntry) -> str | None:
    """Why an entry cannot become a row, or None if it can. Every value is checked against its
    column: one that does not fit would fail the whole chunk's table, on every run."""
    if entry.event is None:
        return "entry is not a JSON object"
    missing = [f for f in REQUIRED if entry.event.get(f) in (None, "")]
    if missing:
        return f"missing fields: {', '.join(missing)}"
    if not isinstance(entry.event["timestamp"], int):
        return "timestamp is not epoch milliseconds"
    for field in EVENT_SCHEMA:
        name = _SOURCE.get(field.name, field.name)
        value = entry.event.get(name)
        if value is None or field.name == "stream_id":
            continue
        if pa.types.is_string(field.type):
            if not isinstance(value, str):
                return f"{name} is not a string"
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name} is not an integer"
        low, high = TIMESTAMP_MS if pa.types.is_timestamp(field.type) else INT_RANGES[str(field.type)]
        if not low <= value <= high:
            return f"{name} {value} is out of range for its {field.type} column"
    return None


def entries_to_table(entries: list[StreamEntry]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in EVENT_SCHEMA}
    for entry in entries:
        e = entry.event
        for name in cols:
            cols[name].append(e.get(_SOURCE.get(name, name)))
        cols["stream_id"][-1] = entry.id
    arrays = {}
    for field in EVENT_SCHEMA:
        values = cols[field.name]
        if pa.types.is_timestamp(field.type):
            arrays[field.name] = pa.array(values, pa.int64()).cast(field.type)
        else:
            arrays[field.name] = pa.array(values, field.type)
    return pa.table(arrays, schema=EVENT_SCHEMA)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(table: pa.Table, path: Path) -> None:
    """Temp file, fsync, rename, fsync the folder: after this returns the file survives a crash.
    The temporary name is this write's own, so two writers never interleave in one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


class ChunkDeadLetters:
    """The in-flight chunk's dead letters, kept in its marker (`dead:<stream id>` fields): a
    redone chunk does not dead-letter an entry twice. Written right after the dead letter, so
    only a crash between the two can still repeat one."""

    PREFIX = b"dead:"

    def __init__(self, client: redis.Redis, inflight_key: str, marker: dict[bytes, bytes]):
        self.client = client
        self.key = inflight_key
        self.done = {k[len(self.PREFIX):].decode() for k in marker if k.startswith(self.PREFIX)}

    def record(self, stream_id: str, dead_letter_id: str) -> None:
        self.client.hset(self.key, f"{self.PREFIX.decode()}{stream_id}", dead_letter_id)
        self.done.add(stream_id)


def _write_chunk(entries: list[StreamEntry], events_dir: Path, dlq: DeadLetterQueue, dead_letters: ChunkDeadLetters) -> tuple[int, int, int]:
    """Write one chunk's partitions; returns (rows, files, newly dead-lettered)."""
    good, dead = [], 0
    for entry in entries:
        problem = export_problem(entry)
        if problem is None:
            good.append(entry)
        elif entry.id not in dead_letters.done:
            dead_letters.record(entry.id, dlq.put("export_events", entry.raw.decode(errors="replace"), problem, stage="export", attempts=1, stream_id=entry.id))
            dead += 1
    if not good:
        return 0, 0, dead
    table = entries_to_table(good)
    dates = pc.strftime(table["timestamp"], format="%Y-%m-%d").to_pylist()
    files = 0
    for date in sorted(set(dates)):
        mask = pa.array([d == date for d in dates])
        write_durable(table.filter(mask), events_dir / f"date={date}" / f"part-{entries[0].id}.parquet")
        files += 1
    return len(good), files, dead


class ExportBusy(RuntimeError):
    """Another export run holds the lock: this one leaves the stream to it."""


LOCK_TTL_MS = 5 * 60 * 1000
"""How long the export lock lasts past its last refresh (one per chunk; a chunk takes seconds).
A run killed outright holds off the next for at most this long."""

# KEYS[1] = lock; ARGV = this run's token, ttl ms. 1 if the run holds the lock: taken now, or
# already its own (refreshed). 0 if another run holds it.
_TAKE_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS = lock, cursor, in-flight marker; ARGV = token, last id of the chunk. Moves the cursor
# only while this run still holds the lock: a run that stalled past the lock's expiry must not
# move back a cursor its successor has moved on, nor drop the successor's in-flight marker.
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _before(entry_id: str) -> str:
    """The id just before `entry_id`, so that reading strictly after it starts at it."""
    ms, seq = (int(x) for x in entry_id.split("-"))
    return f"{ms}-{seq - 1}" if seq else (f"{ms - 1}-{2**64 - 1}" if ms else "0-0")


def export_events(settings: Settings, chunk: int = 20_000, trim: bool = True, attempts: int = 5, backoff_s: float = 0.5) -> dict:
    """Export every entry past the cursor. Transient Redis errors (a lost connection, a stall,
    a refusal such as OOM) are retried with backoff: the cursor and the in-flight marker live
    in Redis, so a retry resumes exactly where the failed attempt stopped (a chunk redone
    overwrites its own Parquet files). Returns with `skipped` set, having exported nothing more,
    when another run holds the export lock."""
    totals = {"exported": 0, "files": 0, "dead_lettered": 0, "trimmed": 0}
    for attempt in range(attempts):
        try:
            stream_length = _export(settings, chunk, trim, totals)
            return {"job": "export_events", **totals, "stream_length": stream_length}
        except ExportBusy as exc:
            log.warning("export: %s; leaving the stream to it", exc)
            return {"job": "export_events", **totals, "skipped": str(exc)}
        except redis.RedisError as exc:
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            log.warning("export: redis error (attempt %d of %d), retrying: %s", attempt + 1, attempts, exc)
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def _export(settings: Settings, chunk: int, trim: bool, totals: dict) -> int:
    """One attempt, holding the export lock from its first chunk to its end (or its failure)."""
    client = connect(settings)
    keys = Keys(settings.redis.key_prefix)
    stream = EventStream.from_settings(client, settings)
    dlq = DeadLetterQueue(client, settings.redis.dead_letter_key)
    groups = (settings.consumer.group,)
    lock, token = keys.export_lock(), uuid.uuid4().hex
    committed = client.get(keys.export_cursor())
    if trim and committed:
        # Before any write: XTRIM is allowed at maxmemory, and freeing what is already in
        # Parquet may be what lets the in-flight marker below be written at all. Safe without
        # the lock: it never passes a committed cursor.
        totals["trimmed"] += trim_exported(client, stream.key, committed.decode(), required_groups=groups)
    take_lock, commit = client.register_script(_TAKE_LOCK), client.register_script(_COMMIT)
    try:
        while True:
            if not take_lock(keys=[lock], args=[token, LOCK_TTL_MS]):
                raise ExportBusy("another export run holds the export lock")
            cursor = (client.get(keys.export_cursor()) or b"0-0").decode()
            inflight = client.hgetall(keys.export_inflight())
            if inflight:  # a previous run died mid-chunk: redo exactly that range
                first, last = inflight[b"first"].decode(), inflight[b"last"].decode()
                entries = stream.read(_before(first), count=2**62, until=last)
                log.info("resuming interrupted export of %s..%s", first, last)
            else:
                entries = stream.read(cursor, chunk)
                if not entries:
                    break
                first, last = entries[0].id, entries[-1].id
                client.hset(keys.export_inflight(), mapping={"first": first, "last": last})
            dead_letters = ChunkDeadLetters(client, keys.export_inflight(), inflight)
            rows, n_files, n_dead = _write_chunk(entries, settings.paths.events_dir, dlq, dead_letters)
            # The three keys share the {export} slot.
            if not commit(keys=[lock, keys.export_cursor(), keys.export_inflight()], args=[token, last]):
                raise ExportBusy("the export lock expired during a chunk and another run took it over")
            for name, n in (("exported", rows), ("files", n_files), ("dead_lettered", n_dead)):
                totals[name] += n
            if trim:
                totals["trimmed"] += trim_exported(client, stream.key, last, required_groups=groups)
            log.info("exported %d events (cursor %s)", totals["exported"], last)
        return stream.length()
    finally:
        try:
            client.register_script(_RELEASE)(keys=[lock], args=[token])
        except redis.RedisError as exc:  # it expires by itself
            log.warning("export: could not release the export lock (it expires within %d s): %s", LOCK_TTL_MS // 1000, exc)


def main() -> None:
    from jobs.common import parse_args, print_summary

    _, settings = parse_args(__doc__)
    print_summary(export_events(settings))


if __name__ == "__main__":
    main()
