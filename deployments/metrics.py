"""EchoTune's own metrics, exported through Ray's Prometheus endpoint (`ray.util.metrics`).

Every node's metrics agent serves them next to Ray's and Serve's own, at
`http://<node>:<metrics-export-port>/metrics` (`ray start --metrics-export-port=8080`; Ray
adds the `ray_` prefix). The service-discovery file Ray writes at
`<temp-dir>/prom_metrics_service_discovery.json` lists every node's endpoint for Prometheus.

| metric (as scraped)                          | type      | tags                       |
| ---                                          | ---       | ---                        |
| ray_echotune_request_latency_ms              | histogram | deployment, route, status  |
| ray_echotune_fallbacks_total                 | counter   | deployment                 |
| ray_echotune_events_total                    | counter   | outcome (accepted, duplicate, rejected) |
| ray_echotune_event_requests_refused_total    | counter   | reason (invalid, unavailable, disabled) |
| ray_echotune_dead_letters                    | gauge     | stream                     |
| ray_echotune_consumer_lag                    | gauge     | group (entries not yet delivered) |
| ray_echotune_consumer_pending                | gauge     | group (delivered, not acknowledged) |
| ray_echotune_feature_fetch_latency_ms        | histogram | deployment                 |
| ray_echotune_recommendation_batch_size       | histogram | (requests per DAG batch)   |
| ray_echotune_refresh_failures_total          | counter   | refresh (the replica class, or experiments) |
| ray_echotune_job_seconds                     | gauge     | job, outcome (last run)    |
| ray_echotune_job_runs_total                  | counter   | job, outcome               |

Metric objects are made lazily, once per process (a Serve replica, a job driver), never at
import time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
"""Histogram buckets for request and fetch latency, in milliseconds."""


@functools.cache
def _metrics() -> dict:
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "request_latency": Histogram(
            "echotune_request_latency_ms", "HTTP request latency per deployment and route template.",
            boundaries=LATENCY_MS_BOUNDARIES, tag_keys=("deployment", "route", "status"),
        ),
        "fallbacks": Counter("echotune_fallbacks_total", "Recommendation requests answered by the degraded path.", tag_keys=("deployment",)),
        "events": Counter("echotune_events_total", "Events per outcome at the gateway.", tag_keys=("outcome",)),
        "refused": Counter(
            "echotune_event_requests_refused_total", "POST /v1/events requests refused whole (422, 503).", tag_keys=("reason",)
        ),
        "dead_letters": Gauge("echotune_dead_letters", "Entries in the dead-letter stream.", tag_keys=("stream",)),
        "consumer_lag": Gauge("echotune_consumer_lag", "Stream entries not yet delivered to a consumer group.", tag_keys=("group",)),
        "consumer_pending": Gauge("echotune_consumer_pending", "Entries delivered to a group but not acknowledged.", tag_keys=("group",)),
        "feature_fetch": Histogram(
            "echotune_feature_fetch_latency_ms", "Time to fetch a user's features (one Redis round trip, or the snapshot).",
            boundaries=LATENCY_MS_BOUNDARIES, tag_keys=("deployment",),
        ),
        "batch_size": Histogram(
            "echotune_recommendation_batch_size", "Recommendation requests travelling the DAG as one batch.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        ),
        "batches_open": Gauge(
            "echotune_recommendation_batches_open",
            "Batches an ingress replica lets travel the DAG at once: below serving.request_batches_in_flight"
            " while the congestion limit holds some back.",
        ),
        "refresh_failures": Counter(
            "echotune_refresh_failures_total", "Failed background reloads of models, lists or experiments (the replica keeps what it had).",
            tag_keys=("refresh",),
        ),
        "job_seconds": Gauge("echotune_job_seconds", "Duration of the last run of a pipeline stage.", tag_keys=("job", "outcome")),
        "job_runs": Counter("echotune_job_runs_total", "Pipeline stage runs per outcome.", tag_keys=("job", "outcome")),
    }


def metric(name: str):
    return _metrics()[name]


def record_fallback(deployment: str = "ApiIngress") -> None:
    metric("fallbacks").inc(1, {"deployment": deployment})


def record_refresh_failure(name: str) -> None:
    metric("refresh_failures").inc(1, {"refresh": name})


def keep_fresh(refresh: Callable[[], object], interval_s: float, name: str):
    """What a replica calls in `__init__`: `refresh` now (so the first request finds it
    loaded), then every `interval_s` on a BackgroundRefresh whose failures are counted in
    `refresh_failures`, the first one's included: a replica that cannot load yet starts
    anyway and degrades rather than failing to start. Returns the started BackgroundRefresh."""
    from app.refresh import BackgroundRefresh

    refresher = BackgroundRefresh(refresh, interval_s, name, on_failure=record_refresh_failure)
    refresher.refresh_now()
    refresher.start()
    return refresher


def record_batch(size: int) -> None:
    metric("batch_size").observe(size)


def record_open_batches(slots: int) -> None:
    metric("batches_open").set(slots)


def record_ingest(result: dict) -> None:
    """Count one EventGateway.ingest result (the dict the ingress maps to HTTP)."""
    if "response" in result:
        r = result["response"]
        for outcome, n in (("accepted", r["accepted"]), ("duplicate", r["duplicates"]), ("rejected", r.get("rejected", 0))):
            if n:
                metric("events").inc(n, {"outcome": outcome})
    else:
        metric("refused").inc(1, {"reason": "invalid" if "errors" in result else "unavailable"})


def record_refused(reason: str) -> None:
    metric("refused").inc(1, {"reason": reason})


def record_job(job: str, outcome: str, seconds: float | None) -> None:
    metric("job_runs").inc(1, {"job": job, "outcome": outcome})
    if seconds is not None:
        metric("job_seconds").set(seconds, {"job": job, "outcome": outcome})


def observe_latency(histogram: str, deployment: str) -> Callable:
    """Decorator: time an async method into `histogram`, tagged with the deployment. The
    observation is recorded after the method has returned its result (`after_answer`)."""

    def wrap(fn):
        @functools.wraps(fn)
        async def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                after_answer(metric(histogram).observe, (time.perf_counter() - t0) * 1000, {"deployment": deployment})

        return timed

    return wrap


def after_answer(record: Callable, *args) -> None:
    """Run `record(*args)` on the event loop's next turn, behind what is already scheduled
    there: the ingress's calls down the DAG go out first, and a replica's method hands its
    result back to Serve first. Recording a Ray metric costs ~0.03 ms of CPU with a live
    replica's cold caches, which on the request's path is latency."""
    asyncio.get_running_loop().call_soon(record, *args)


class RequestMetrics:
    """ASGI middleware: latency of every HTTP request, tagged with the route *template*
    (`/v1/users/{user_id}/recommendations`, not the user id, so the series stay few)."""

    def __init__(self, app, deployment: str):
        self.app, self.deployment = app, deployment

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metric("request_latency").observe(
                (time.perf_counter() - t0) * 1000,
                {"deployment": self.deployment, "route": route, "status": str(status["code"])},
            )


def stream_health(client, stream_key: str, dead_letter_key: str, scan_cap: int = 100_000) -> dict:
    """Dead letters, and per consumer group its lag and pending entries. Redis 7 reports a
    group's lag itself; on 6.2 the entries after its last delivered id are counted (up to
    `scan_cap`)."""
    import redis

    out = {"dead_letters": client.xlen(dead_letter_key), "groups": {}}
    try:
        groups = client.xinfo_groups(stream_key)
    except redis.ResponseError:  # no stream yet
        return out
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        lag = g.get("lag")
        if lag is None:
            last = g["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            lag = len(client.xrange(stream_key, min=f"({last}", count=scan_cap))
        out["groups"][name] = {"lag": int(lag), "pending": int(g["pending"])}
    return out


def export_stream_health(sample: dict, dead_letter_key: str) -> None:
    metric("dead_letters").set(sample["dead_letters"], {"stream": dead_letter_key})
    for group, g in sample["groups"].items():
        metric("consumer_lag").set(g["lag"], {"group": group})
        metric("consumer_pending").set(g["pending"], {"group": group})


def start_stream_health_poller(client, stream_key: str, dead_letter_key: str, interval_s: float = 5.0) -> threading.Event:
    """A daemon thread refreshing the stream gauges; set the returned event to stop it."""
    stop = threading.Event()

    def loop():
        import redis

        while not stop.wait(interval_s):
            try:
                export_stream_health(stream_health(client, stream_key, dead_letter_key), dead_letter_key)
            except redis.RedisError as exc:  # Redis down: the gauges keep their last value
                log.debug("stream health not sampled: %s", exc)

    threading.Thread(target=loop, name="echotune-stream-health", daemon=True).start()
    return stop
