"""One POST /v1/events, start to finish, without Ray: validate, enrich, append, answer.

The gateway deployment is a thin wrapper around `EventIngestor`, so the whole ingestion
contract (statuses, 422 paths, 503 when Redis is gone) is testable against a real Redis in
milliseconds.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import redis

from app.config import GatewaySettings
from app.events.enrichment import RequestContext, enrich
from app.events.stream import AppendStatus, EventStream, PendingEvent
from app.events.validation import EventValidationError, parse_events
from app.schemas import EventResult, EventStatus, IngestResponse

log = logging.getLogger(__name__)

CONFLICT_REASON = "event_id already used for a different event"
_STATUS = {
    AppendStatus.accepted: (EventStatus.accepted, None),
    AppendStatus.duplicate: (EventStatus.duplicate, None),
    AppendStatus.conflict: (EventStatus.rejected, CONFLICT_REASON),
}


class StorageUnavailable(RuntimeError):
    """Redis could not be reached or refused the write: nothing was acknowledged, the client
    should retry. `detail` is the client-facing message (it says when Redis is full)."""

    def __init__(self, message: str, detail: str = "event store unavailable, retry"):
        super().__init__(message)
        self.detail = detail


def storage_refusal_detail(exc: redis.RedisError, what: str = "event store") -> str:
    """What a client (and the SRE reading its logs) is told: "full" is an operator's problem
    (raise maxmemory, export and trim the stream), "unavailable" usually heals by itself."""
    # Inside a Lua script the OOM refusal comes back as a plain ResponseError "... -OOM ...".
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(exc):
        return f"{what} full (Redis maxmemory reached), nothing stored; retry later"
    return f"{what} unavailable, retry"


class EventIngestor:
    def __init__(self, stream: EventStream, settings: GatewaySettings):
        self.stream = stream
        self.settings = settings

    def ingest(self, body: object, ctx: RequestContext, now: datetime) -> IngestResponse:
        """Raises EventValidationError (→ 422, nothing stored) or StorageUnavailable (→ 503)."""
        events = parse_events(body, self.settings, now)
        pending = []
        for e in events:
            enriched = enrich(e, ctx)
            doc = enriched.document
            pending.append(PendingEvent(e.event_id, doc["user_id"], doc["timestamp"], enriched.fingerprint, enriched.json))
        try:
            appended = self.stream.append(pending)
        except redis.RedisError as exc:
            # Includes timeouts: the script may or may not have run, so the client must retry;
            # a retry of what did land is reported as a duplicate, never stored twice.
            log.warning("event append failed, answering 503: %s: %s", type(exc).__name__, exc)
            raise StorageUnavailable(str(exc), storage_refusal_detail(exc)) from exc
        results, counts = [], {s: 0 for s in AppendStatus}
        for event, res in zip(events, appended):
            counts[res.status] += 1
            status, reason = _STATUS[res.status]
            # model_construct: the values are ours and already valid; validating 1,000 of them
            # per request would cost more than the append.
            results.append(EventResult.model_construct(event_id=event.event_id, status=status, reason=reason))
        return IngestResponse.model_construct(
            accepted=counts[AppendStatus.accepted],
            duplicates=counts[AppendStatus.duplicate],
            rejected=counts[AppendStatus.conflict],
            results=results,
        )


def ingest_outcome(ingestor: EventIngestor, body: object, user_agent: str | None, accept_language: str | None) -> dict:
    """One request's outcome as plain data for the HTTP layer: {"response": IngestResponse as
    JSON-ready dict}, {"errors": [...]} (→ 422) or {"unavailable": seconds, "detail": message}
    (→ 503 + Retry-After). Plain dicts: they cross a deployment handle cheaper than pydantic
    models, and the ingress maps them the same way whether it ran this in-process or not."""
    now = datetime.now(timezone.utc)
    ctx = RequestContext.from_headers(user_agent, accept_language, int(now.timestamp() * 1000))
    try:
        return {"response": ingestor.ingest(body, ctx, now).model_dump(mode="json")}
    except EventValidationError as exc:
        return {"errors": exc.errors}
    except StorageUnavailable as exc:
        return {"unavailable": ingestor.settings.unavailable_retry_after_s, "detail": exc.detail}
