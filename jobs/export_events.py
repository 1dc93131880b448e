"""Export the event stream to Parquet, exactly once, and trim what is safely exported.

    ray job submit --working-dir . -- python -m jobs.export_events --config ray_config.yaml

Reads the Redis Stream from the saved cursor in chunks and writes each chunk as
`events/date=YYYY-MM-DD/part-<first stream id>.parquet`. Exactly once, across crashes and
Redis restarts:
1. the chunk's id range is recorded in Redis before any file is written, so a re-run after a
   crash re-exports exactly the same range into the same file names (overwriting, not adding);
2. each file is written to a temporary name, fsynced, renamed, and its folder fsynced;
3. only then the cursor moves (and the in-flight range is cleared) in one MULTI;
4. only then the stream is trimmed, and never past an entry a consumer group still holds or
   has not read yet; while the configured group (`consumer.group`) does not exist, not at all:
   it will be created at the start of the stream and must find every event there.
Entries that cannot be exported (not JSON, missing fields) go to the dead-letter stream with
stage `export`; the job carries on.
"""

from __future__ import annotations

import logging
import time
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis

from app.config import Settings
from app.events.dead_letter import DeadLetterQueue
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


def export_problem(entry: StreamEntry) -> str | None:
    """Why an entry cannot become a row, or None if it can."""
    if entry.event is None:
        return "entry is not a JSON object"
    missing = [f for f in REQUIRED if entry.event.get(f) in (None, "")]
    if missing:
        return f"missing fields: {', '.join(missing)}"
    if not isinstance(entry.event["timestamp"], int):
        return "timestamp is not epoch milliseconds"
    return None


def entries_to_table(entries: list[StreamEntry]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in EVENT_SCHEMA}
    for entry in entries:
        e = entry.event
        for name in cols:
            cols[name].append(e.get(name))
        cols["received_at"][-1] = e.get("received_at_ms")
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
    """Temp file, fsync, rename, fsync the folder: after this returns the file survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _write_chunk(entries: list[StreamEntry], events_dir: Path, dlq: DeadLetterQueue) -> tuple[int, int, int]:
    """Write one chunk's partitions; returns (rows, files, dead-lettered)."""
    good, dead = [], 0
    for entry in entries:
        problem = export_problem(entry)
        if problem is None:
            good.append(entry)
        else:
            dlq.put("export_events", entry.raw.decode(errors="replace"), problem, stage="export", attempts=1, stream_id=entry.id)
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


TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
"""Redis errors a retry can outlast: a restart, or a stall (an append-only-file rewrite with
`appendfsync always` can block the server for seconds)."""


def _before(entry_id: str) -> str:
    """The id just before `entry_id`, so that reading strictly after it starts at it."""
    ms, seq = (int(x) for x in entry_id.split("-"))
    return f"{ms}-{seq - 1}" if seq else (f"{ms - 1}-{2**64 - 1}" if ms else "0-0")


def export_events(settings: Settings, chunk: int = 20_000, trim: bool = True, attempts: int = 5, backoff_s: float = 0.5) -> dict:
    """Export every entry past the cursor. Transient Redis errors are retried with backoff:
    the cursor and the in-flight marker live in Redis, so a retry resumes exactly where the
    failed attempt stopped (a chunk redone overwrites its own Parquet files)."""
    totals = {"exported": 0, "files": 0, "dead_lettered": 0, "trimmed": 0}
    for attempt in range(attempts):
        try:
            stream_length = _export(settings, chunk, trim, totals)
            return {"job": "export_events", **totals, "stream_length": stream_length}
        except TRANSIENT as exc:
            if attempt == attempts - 1:
                raise
            log.warning("export: redis error (attempt %d of %d), retrying: %s", attempt + 1, attempts, exc)
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def _export(settings: Settings, chunk: int, trim: bool, totals: dict) -> int:
    client = connect(settings)
    keys = Keys(settings.redis.key_prefix)
    stream = EventStream.from_settings(client, settings)
    dlq = DeadLetterQueue(client, settings.redis.dead_letter_key)
    while True:
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
        rows, n_files, n_dead = _write_chunk(entries, settings.paths.events_dir, dlq)
        pipe = client.pipeline(transaction=True)  # both keys share the {export} slot
        pipe.set(keys.export_cursor(), last)
        pipe.delete(keys.export_inflight())  # not chained: the cluster pipeline's delete returns None
        pipe.execute()
        for name, n in (("exported", rows), ("files", n_files), ("dead_lettered", n_dead)):
            totals[name] += n
        if trim:
            totals["trimmed"] += trim_exported(client, stream.key, last, required_groups=(settings.consumer.group,))
        log.info("exported %d events (cursor %s)", totals["exported"], last)
    return stream.length()


def main() -> None:
    from jobs.common import parse_args, print_summary

    _, settings = parse_args(__doc__)
    print_summary(export_events(settings))


if __name__ == "__main__":
    main()
