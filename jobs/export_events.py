"""Export the event stream to Parquet, exactly once.

    ray job submit --working-dir . -- python -m jobs.export_events --config ray_config.yaml

Reads the Redis Stream from the saved cursor in chunks and writes each chunk as
`events/date=YYYY-MM-DD/part-<first stream id>.parquet`. A file is named by the first entry
of its chunk and written by rename, and the cursor moves only after the file is in place, so a
crash and re-run rewrites the same file instead of duplicating rows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.config import Settings
from app.events.stream import EventStream, StreamEntry
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


def entries_to_table(entries: list[StreamEntry]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in EVENT_SCHEMA}
    for entry in entries:
        e = entry.event
        for name in cols:
            cols[name].append(e.get(name))
        cols["timestamp"][-1] = e["timestamp"]
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


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def export_events(settings: Settings, chunk: int = 20_000) -> dict:
    client = connect(settings)
    keys = Keys(settings.redis.key_prefix)
    stream = EventStream(client, settings.redis.stream_key, keys.dedup())
    cursor = (client.get(keys.export_cursor()) or b"0-0").decode()
    exported = files = 0
    for entries in stream.iter_from(cursor, chunk):
        table = entries_to_table(entries)
        dates = pc.strftime(table["timestamp"], format="%Y-%m-%d").to_pylist()
        first = entries[0].id
        for date in sorted(set(dates)):
            mask = pa.array([d == date for d in dates])
            _write_atomic(table.filter(mask), settings.paths.events_dir / f"date={date}" / f"part-{first}.parquet")
            files += 1
        client.set(keys.export_cursor(), entries[-1].id)
        exported += len(entries)
        log.info("exported %d events (cursor %s)", exported, entries[-1].id)
    return {"job": "export_events", "exported": exported, "files": files, "stream_length": stream.length()}


def main() -> None:
    from jobs.common import parse_args, print_summary

    _, settings = parse_args(__doc__)
    print_summary(export_events(settings))


if __name__ == "__main__":
    main()
