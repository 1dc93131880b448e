"""EventGateway: validates listening events and appends them durably to the Redis Stream."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from ray import serve

from app.config import Settings
from app.events.stream import EventStream
from app.events.validation import EventValidationError, parse_events
from app.keys import Keys
from app.redis_server import connect
from app.schemas import EventResult, EventStatus, IngestResponse

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0})
class EventGateway:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = connect(settings)
        self.stream = EventStream(self.client, settings.redis.stream_key, Keys(settings.redis.key_prefix).dedup())

    def ingest(self, body: object) -> dict:
        """Returns {"response": IngestResponse} or {"errors": [...]} for the ingress to map to HTTP."""
        now = datetime.now(timezone.utc)
        try:
            events = parse_events(body, self.settings.gateway, now)
        except EventValidationError as exc:
            return {"errors": exc.errors}
        ids = self.stream.append(events, received_at_ms=int(now.timestamp() * 1000))
        results = [
            EventResult(event_id=e.event_id, status=EventStatus.accepted if i else EventStatus.duplicate)
            for e, i in zip(events, ids)
        ]
        accepted = sum(1 for i in ids if i)
        return {"response": IngestResponse(accepted=accepted, duplicates=len(ids) - accepted, results=results)}

    def check_health(self) -> None:
        self.client.ping()  # raises when Redis is gone, so Serve marks the replica unhealthy
