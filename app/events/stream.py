"""The durable event log: a Redis Stream with idempotent appends.

Every accepted event is one stream entry holding its JSON. Appends go through one Lua script
so that "first time we see this event_id → XADD, else report a duplicate" is atomic even
with several gateway replicas: a client retrying after a timeout never double-counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import redis

from app.schemas import SCHEMA_VERSION, Event

# KEYS[1] = stream, ARGV = dedup_prefix, ttl_s, then (event_id, payload) pairs.
# Returns one entry per event: the stream id, or 0 for a duplicate.
_APPEND = """
local out = {}
local prefix, ttl = ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  if redis.call('SET', prefix .. ARGV[i], '1', 'NX', 'EX', ttl) then
    out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[i + 1])
  else
    out[#out + 1] = 0
  end
end
return out
"""


def event_to_json(event: Event, received_at_ms: int) -> str:
    doc = event.model_dump(mode="json", exclude_none=True)
    doc["timestamp"] = round(event.timestamp.timestamp() * 1000)  # epoch ms: the Parquet unit
    doc["received_at_ms"] = received_at_ms
    doc["schema_version"] = SCHEMA_VERSION
    return json.dumps(doc, separators=(",", ":"))


@dataclass
class StreamEntry:
    id: str
    event: dict


class EventStream:
    def __init__(self, client: redis.Redis, key: str, dedup_prefix: str, dedup_ttl_s: int = 7 * 24 * 3600):
        self.client = client
        self.key = key
        self.dedup_prefix = dedup_prefix
        self.dedup_ttl_s = dedup_ttl_s
        self._append = client.register_script(_APPEND)

    def append(self, events: list[Event], received_at_ms: int) -> list[str | None]:
        """Append in one atomic call; returns the stream id per event, None if a duplicate."""
        if not events:
            return []
        argv: list[str | int] = [self.dedup_prefix, self.dedup_ttl_s]
        for event in events:
            argv += [str(event.event_id), event_to_json(event, received_at_ms)]
        ids = self._append(keys=[self.key], args=argv)
        return [i.decode() if isinstance(i, bytes) else None for i in ids]

    def read(self, after: str = "0-0", count: int = 10_000) -> list[StreamEntry]:
        """Entries strictly after `after`, oldest first."""
        rows = self.client.xrange(self.key, min=f"({after}" if after != "0-0" else "-", max="+", count=count)
        return [StreamEntry(id=i.decode(), event=json.loads(f[b"e"])) for i, f in rows]

    def iter_from(self, after: str = "0-0", chunk: int = 10_000) -> Iterator[list[StreamEntry]]:
        while True:
            entries = self.read(after, chunk)
            if not entries:
                return
            yield entries
            after = entries[-1].id

    def length(self) -> int:
        return int(self.client.xlen(self.key))
