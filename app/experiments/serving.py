"""The experiment side of a recommendation request, kept out of the ingress: assign the user,
hand the variant's overrides to the ranking steps, label the response and log the exposure.

Exposures are impression events (one per recommended track, with position, the request id as
recommendation_id, experiment and variant, and the request's serving time in `duration_ms`,
which the evaluator's latency p95 reads) appended through the same idempotent EventStream as
client events. A failed exposure append is logged and the recommendation still answered: an
experiment losing a few exposures is better than listeners losing their recommendations.

    router = ExperimentRouter.from_settings(client, settings)
    assignments, params = router.assign(user_id)
    ... blend(features, params) ... rerank(blended, k, request_id, params) ...
    response = router.label(response, assignments); router.log_exposures(response, assignments, latency_ms)
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import redis

from app.config import ServingSettings, Settings
from app.events.stream import EventStream, PendingEvent
from app.experiments.assignment import Assignment, AssignmentCache, merged_params
from app.experiments.definitions import apply_overrides
from app.experiments.registry import ExperimentRegistry
from app.keys import Keys
from app.schemas import SCHEMA_VERSION, RecommendationResponse

log = logging.getLogger(__name__)


def serving_with(serving: ServingSettings, params: dict[str, Any] | None) -> ServingSettings:
    """The variant's serving settings, or the defaults if the overrides are invalid: a bad
    definition must never fail a request."""
    try:
        return apply_overrides(serving, params)
    except ValueError as exc:
        log.warning("ignoring experiment overrides: %s", exc)
        return serving


def exposure_events(response: RecommendationResponse, assignment: Assignment, latency_ms: int, now_ms: int) -> list[PendingEvent]:
    out = []
    for position, item in enumerate(response.items):
        event_id = uuid.uuid4()
        doc = {
            "event_id": str(event_id),
            "user_id": response.user_id,
            "track_id": item.track_id,
            "event_type": "impression",
            "timestamp": now_ms,
            "position": position,
            "recommendation_id": response.request_id,
            "experiment": assignment.experiment,
            "variant": assignment.variant,
            "duration_ms": latency_ms,
            "received_at_ms": now_ms,
            "schema_version": SCHEMA_VERSION,
        }
        out.append(PendingEvent(event_id=event_id, user_id=response.user_id, timestamp_ms=now_ms, fingerprint=event_id.bytes[:8], document_json=json.dumps(doc, separators=(",", ":"))))
    return out


class ExperimentRouter:
    def __init__(self, cache: AssignmentCache, stream: EventStream | None):
        self.cache = cache
        self.stream = stream

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings, refresh_interval_s: float | None = None) -> "ExperimentRouter":
        """`refresh_interval_s` of the assignment cache: by default the configured one; inf
        when a BackgroundRefresh calls `cache.refresh` instead."""
        registry = ExperimentRegistry(client, Keys(settings.redis.key_prefix))
        cfg = settings.experiments
        stream = EventStream.from_settings(client, settings) if cfg.log_exposures else None
        interval = cfg.refresh_interval_s if refresh_interval_s is None else refresh_interval_s
        return cls(AssignmentCache(registry.snapshot, interval), stream)

    def assign(self, user_id: str) -> tuple[list[Assignment], dict[str, Any] | None]:
        assignments = self.cache.assign(user_id)
        return assignments, (merged_params(assignments) or None)

    @staticmethod
    def label(response: RecommendationResponse, assignments: list[Assignment]) -> RecommendationResponse:
        if not assignments:
            return response
        first = assignments[0]
        return response.model_copy(update={"experiment": first.experiment, "variant": first.variant})

    def log_exposures(self, response: RecommendationResponse, assignments: list[Assignment], latency_ms: int) -> int:
        """Append the impressions; returns how many were appended (0 on failure, logged)."""
        if self.stream is None or not assignments or not response.items:
            return 0
        now_ms = int(time.time() * 1000)
        events = [e for a in assignments for e in exposure_events(response, a, latency_ms, now_ms)]
        try:
            self.stream.append(events)
        except redis.RedisError as exc:
            log.warning("could not log %d exposures of request %s: %s", len(events), response.request_id, exc)
            return 0
        return len(events)
