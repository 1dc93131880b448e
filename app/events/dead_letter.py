"""Dead-letter queue: records a job or the gateway could not process, kept with the reason.

Nothing is dropped silently: a bad record goes here, the job carries on, and an operator can
inspect and replay the queue later.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis


class DeadLetterQueue:
    def __init__(self, client: redis.Redis, key: str):
        self.client = client
        self.key = key

    def put(self, source: str, record: Any, reason: str) -> str:
        entry = {
            "source": source,
            "reason": reason,
            "record": json.dumps(record, default=str),
            "at_ms": str(int(time.time() * 1000)),
        }
        return self.client.xadd(self.key, entry).decode()

    def entries(self, count: int = 1000) -> list[dict[str, Any]]:
        rows = self.client.xrange(self.key, count=count)
        return [
            {"id": i.decode(), **{k.decode(): v.decode() for k, v in f.items()}} for i, f in rows
        ]

    def __len__(self) -> int:
        return int(self.client.xlen(self.key))
