"""EventGateway: validates, enriches and durably appends listening events (app/events/ingest.py)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from ray import serve

from app.config import Settings
from app.events.enrichment import RequestContext
from app.events.ingest import EventIngestor, StorageUnavailable
from app.events.stream import EventStream
from app.events.validation import EventValidationError
from app.redis_server import connect
from deployments.metrics import record_ingest, start_stream_health_poller

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class EventGateway:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = connect(settings)
        self.ingestor = EventIngestor(EventStream.from_settings(self.client, settings), settings.gateway)
        # Dead letters and consumer lag as gauges (deployments/metrics.py), sampled off the request path.
        self._stop_health = start_stream_health_poller(self.client, settings.redis.stream_key, settings.redis.dead_letter_key)

    def ingest(self, body: object, user_agent: str | None = None, accept_language: str | None = None) -> dict:
        """{"response": IngestResponse}, {"errors": [...]} (→ 422) or {"unavailable": seconds,
        "detail": message} (→ 503 + Retry-After), for the ingress to map to HTTP."""
        result = self._ingest(body, user_agent, accept_language)
        record_ingest(result)
        return result

    def _ingest(self, body: object, user_agent: str | None, accept_language: str | None) -> dict:
        now = datetime.now(timezone.utc)
        ctx = RequestContext.from_headers(user_agent, accept_language, int(now.timestamp() * 1000))
        try:
            # A plain dict crosses the handle cheaper than 1,000 pickled pydantic models.
            return {"response": self.ingestor.ingest(body, ctx, now).model_dump(mode="json")}
        except EventValidationError as exc:
            return {"errors": exc.errors}
        except StorageUnavailable as exc:
            return {"unavailable": self.settings.gateway.unavailable_retry_after_s, "detail": exc.detail}

    # No Redis ping in check_health: restarting a gateway does not bring Redis back, and a live
    # gateway answering 503 + Retry-After is what a client needs while Redis is down.
