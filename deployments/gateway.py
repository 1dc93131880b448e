"""Event ingestion for POST /v1/events: validate, enrich, durably append (app/events/ingest.py).

Where the work runs is `gateway.in_process`. By default the ingress replica runs it itself
(`LocalGateway`, reached through `ingest_events`): a batch then costs one Serve hop (proxy ->
ingress), not two, which on 2 cores is about a quarter of the CPU a batch costs (measured by
benchmarks/ingest.py). With `in_process: false` the ingress calls the `EventGateway`
deployment through its handle, so ingestion can be scaled apart from the ingress. The
deployment also samples the stream's health gauges (dead letters, consumer lag) either way.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from app.config import Settings
from app.events.ingest import EventIngestor, ingest_outcome
from app.events.stream import EventStream
from app.redis_server import connect
from deployments.metrics import record_ingest, start_stream_health_poller

log = logging.getLogger("ray.serve")

_LOCAL_ATTR = "_local_event_gateway"


class LocalGateway:
    """The gateway's work inside whichever replica holds it: no Ray in the call."""

    def __init__(self, settings: Settings, client=None):
        self.client = client or connect(settings)
        self.ingestor = EventIngestor(EventStream.from_settings(self.client, settings), settings.gateway)

    def ingest(self, body: object, user_agent: str | None = None, accept_language: str | None = None) -> dict:
        """{"response": ...}, {"errors": [...]} (→ 422) or {"unavailable": s, "detail": ...} (→ 503)."""
        result = ingest_outcome(self.ingestor, body, user_agent, accept_language)
        record_ingest(result)
        return result


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class EventGateway:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.local = LocalGateway(settings)
        # Dead letters and consumer lag as gauges (deployments/metrics.py), sampled off the request path.
        self._stop_health = start_stream_health_poller(self.local.client, settings.redis.stream_key, settings.redis.dead_letter_key)

    def ingest(self, body: object, user_agent: str | None = None, accept_language: str | None = None) -> dict:
        return self.local.ingest(body, user_agent, accept_language)

    # No Redis ping in check_health: restarting a gateway does not bring Redis back, and a live
    # gateway answering 503 + Retry-After is what a client needs while Redis is down.


async def ingest_events(ingress, body: object, user_agent: str | None, accept_language: str | None) -> dict:
    """POST /v1/events' outcome for the ingress replica `ingress` (its `settings`, and its
    `gateway` handle when `gateway.in_process` is off)."""
    if not ingress.settings.gateway.in_process:
        return await ingress.gateway.ingest.remote(body, user_agent, accept_language)
    # Made on first use: the ingress's constructor is shared with the recommendation routes.
    local = ingress.__dict__.get(_LOCAL_ATTR) or ingress.__dict__.setdefault(_LOCAL_ATTR, LocalGateway(ingress.settings))
    # In a thread: the append waits on Redis (an fsync per batch with appendfsync always), and
    # the ingress's event loop keeps serving other requests meanwhile.
    return await asyncio.to_thread(local.ingest, body, user_agent, accept_language)
