"""Dead-letter queue: records a job or the gateway could not process, kept with the reason.

Nothing is dropped silently: a bad record goes here, the job carries on, and an operator can
inspect and replay the queue later.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis


class DeadLetterQueue:
    def __init__(self, client: redis.Redis, key: str):
        self.client = client
        self.key = key

    def put(self, source: str, record: Any, reason: str, stage: str = "", attempts: int = 0, stream_id: str = "") -> str:
        return self.client.xadd(self.key, self.entry(source, record, reason, stage, attempts, stream_id)).decode()

    def put_many(self, source: str, letters: Iterable[tuple[Any, str]], chunk: int = 1000) -> int:
        """(record, reason) pairs, one pipelined round trip per `chunk`: a batch job may have
        thousands of bad records. Returns how many were written."""
        n, pipe = 0, self.client.pipeline(transaction=False)
        for record, reason in letters:
            pipe.xadd(self.key, self.entry(source, record, reason))
            n += 1
            if n % chunk == 0:
                pipe.execute()
        pipe.execute()
        return n

    @staticmethod
    def entry(source: str, record: Any, reason: str, stage: str = "", attempts: int = 0, stream_id: str = "") -> dict[str, str]:
        """The fields of one dead letter: what failed where, how often, and the original payload
        (a string payload is kept verbatim, so a replay sees exactly what was stored)."""
        return {
            "source": source,
            "reason": reason,
            "stage": stage or source,
            "attempts": str(attempts),
            "stream_id": stream_id,
            "record": record if isinstance(record, str) else json.dumps(record, default=str),
            "at_ms": str(int(time.time() * 1000)),
        }

    def entries(self, count: int = 1000) -> list[dict[str, Any]]:
        rows = self.client.xrange(self.key, count=count)
        return [
            {"id": i.decode(), **{k.decode(): v.decode() for k, v in f.items()}} for i, f in rows
        ]

    def __len__(self) -> int:
        return int(self.client.xlen(self.key))
