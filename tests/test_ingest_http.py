"""POST /v1/events over real HTTP through Serve (2 ingress replicas, 1 gateway) on a Redis of
this module's own (append-only, so it can be restarted): auth, bad input, per-event statuses,
the rate limit across replicas, export exactly once across a Redis restart and a crashed
export, and 503 while Redis is down."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx
import pandas as pd
import pytest
import redis

from app.config import settings_from_args
from app.events.auth import ApiKeyStore
from app.keys import Keys
from app.redis_server import EmbeddedRedis

pytestmark = pytest.mark.ray

APP, PREFIX = "ingest-test", "/ingest-test"
MAX_BATCH, MAX_BODY, BURST = 5, 20_000, 100


def event(**over) -> dict:
    ts = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
    return {"event_id": str(uuid.uuid4()), "user_id": "u1", "track_id": "t1", "event_type": "play", "timestamp": ts, **over}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, serve_port):
    from ray import serve

    from deployments.gateway import EventGateway
    from deployments.ingress import ApiIngress

    tmp = tmp_path_factory.mktemp("ingest")
    server = EmbeddedRedis(tmp / "redis", appendonly=True).start()
    limit = {"rate_per_s": 0.001, "burst": BURST}  # no meaningful refill during the test
    settings = settings_from_args({
        "redis": {"url": server.url, "key_prefix": "it"},
        "paths": {"state_dir": str(tmp / "state")},
        "gateway": {"max_batch": MAX_BATCH, "max_body_bytes": MAX_BODY},
        "rate_limit": {"ingest": limit, "read": limit, "admin": limit},
    })
    app = ApiIngress.options(num_replicas=2).bind(settings, EventGateway.bind(settings), None, None, None)
    serve.run(app, name=APP, route_prefix=PREFIX)
    client = redis.Redis.from_url(server.url)
    store = ApiKeyStore(client, Keys("it"))
    http = httpx.Client(base_url=f"http://127.0.0.1:{serve_port}{PREFIX}", timeout=30)
    yield {"server": server, "settings": settings, "redis": client, "store": store, "http": http}
    http.close()
    serve.delete(APP)
    server.stop()


def bearer(stack, *scopes) -> dict:
    return {"Authorization": f"Bearer {stack['store'].create(set(scopes)).token}"}


def stream_len(stack) -> int:
    return stack["redis"].xlen(stack["settings"].redis.stream_key)


def test_health_and_docs_are_open_everything_else_needs_a_scoped_key(stack):
    http = stack["http"]
    assert http.get("/healthz").status_code == 200 and http.get("/docs").status_code == 200
    assert http.post("/v1/events", json=event()).status_code == 401
    assert http.post("/v1/events", json=event(), headers={"Authorization": "Bearer etk_bad_key"}).status_code == 401
    assert http.post("/v1/events", json=event(), headers=bearer(stack, "read")).status_code == 403
    revoked = stack["store"].create({"ingest"})
    stack["store"].revoke(revoked.key_id)
    # Replicas may trust a key record for auth.cache_ttl_s; this key was never seen, so no cache.
    assert http.post("/v1/events", json=event(), headers={"X-API-Key": revoked.token}).status_code == 401
    assert stream_len(stack) == 0


@pytest.mark.parametrize(
    "body, status, loc, words",
    [
        ({"events": [event(), event(position="first")]}, 422, ["body", "events", 1, "position"], "integer"),
        ({"events": [{k: v for k, v in event().items() if k != "track_id"}]}, 422, ["body", "events", 0, "track_id"], "required"),
        ({"events": [event(event_type="listen")]}, 422, ["body", "events", 0, "event_type"], "play"),
        # Beyond int64 the export could not store it; beyond a date, the timestamp once crashed (500).
        ({"events": [event(duration_ms=2**64)]}, 422, ["body", "events", 0, "duration_ms"], "less than or equal"),
        (event(timestamp=1e20), 422, ["body", "timestamp"], "out of range"),
        ({"events": [event() for _ in range(MAX_BATCH + 1)]}, 422, ["body", "events"], f"at most {MAX_BATCH}"),
        # A day ahead: the parameters are made when pytest collects, and this case may run many
        # minutes later, so ten minutes ahead (twice the 5-minute allowance) was not enough.
        (event(timestamp=(datetime.now(timezone.utc) + timedelta(days=1)).isoformat()), 422, ["body", "timestamp"], "future"),
        ({"events": []}, 422, ["body", "events"], "at least 1"),
        (b'{"events": [', 422, ["body", 12], "JSON"),
        (b"x" * (MAX_BODY + 1), 413, ["body"], "larger than"),
    ],
    ids=["wrong-type", "missing-field", "unknown-event-type", "beyond-int64", "timestamp-out-of-range", "oversized-batch", "future-timestamp", "empty-batch", "invalid-json", "oversized-body"],
)
def test_bad_input_is_4xx_naming_the_problem_and_nothing_is_stored(stack, body, status, loc, words):
    before = stream_len(stack)
    headers = {**bearer(stack, "ingest"), "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = stack["http"].post("/v1/events", content=content, headers=headers)
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"][0]
    assert detail["loc"] == loc and words.lower() in detail["msg"].lower(), detail
    assert stream_len(stack) == before


def test_each_event_is_reported_accepted_duplicate_or_rejected(stack):
    http, headers = stack["http"], {**bearer(stack, "ingest"), "User-Agent": "Mozilla/5.0 (iPhone) Mobile", "Accept-Language": "nl-NL"}
    a, b = event(user_id="status-user"), event(user_id="status-user")
    before = stream_len(stack)
    first = http.post("/v1/events", json={"events": [a, b]}, headers=headers).json()
    second = http.post("/v1/events", json={"events": [a, {**b, "track_id": "t9"}, event()]}, headers=headers).json()
    assert [r["status"] for r in first["results"]] == ["accepted", "accepted"]
    assert [r["status"] for r in second["results"]] == ["duplicate", "rejected", "accepted"]
    assert "different event" in second["results"][1]["reason"]
    assert (second["accepted"], second["duplicates"], second["rejected"]) == (1, 1, 1)
    assert stream_len(stack) == before + 3
    stored = [json.loads(f[b"e"]) for _, f in stack["redis"].xrange(stack["settings"].redis.stream_key)]
    mine = [e for e in stored if e["user_id"] == "status-user"]
    assert {e["device_type"] for e in mine} == {"mobile"} and {e["locale"] for e in mine} == {"nl-NL"}
    assert len({e["session_id"] for e in mine}) == 1


def test_rate_limit_holds_within_5_percent_across_two_replicas(stack):
    from ray import serve

    status = serve.status().applications[APP].deployments["ApiIngress"]
    assert status.replica_states.get("RUNNING") == 2
    headers = bearer(stack, "ingest")
    total = int(BURST * 1.6)

    def post(_):
        with httpx.Client(base_url=str(stack["http"].base_url), timeout=30) as c:
            return [c.post("/v1/events", json={}, headers=headers).status_code for _ in range(total // 16)]

    with ThreadPoolExecutor(16) as pool:
        codes = [c for batch in pool.map(post, range(16)) for c in batch]
    allowed = sum(1 for c in codes if c != 429)
    assert set(codes) <= {422, 429}, set(codes)
    assert BURST <= allowed <= BURST * 1.05, allowed
    refused = stack["http"].post("/v1/events", json={}, headers=headers)
    assert refused.status_code == 429 and refused.headers["Retry-After"].isdigit()


def test_redis_restart_then_export_writes_every_acknowledged_event_once(stack, monkeypatch):
    import jobs.export_events as export_job

    http, headers, settings = stack["http"], bearer(stack, "ingest"), stack["settings"]
    acked = {json.loads(f[b"e"])["event_id"] for _, f in stack["redis"].xrange(settings.redis.stream_key)}  # earlier tests'
    for _ in range(3):
        batch = [event(user_id="restart-user") for _ in range(MAX_BATCH)]
        resp = http.post("/v1/events", json={"events": batch}, headers=headers)
        assert resp.status_code == 200
        acked |= {r["event_id"] for r in resp.json()["results"] if r["status"] == "accepted"}
        http.post("/v1/events", json={"events": batch[:2]}, headers=headers)  # a client retry

    stack["server"].stop()  # SIGTERM: Redis flushes its append-only file
    stack["server"].start()

    real_write = export_job._write_chunk
    calls = []

    def write_then_crash(*args):
        calls.append(1)
        out = real_write(*args)
        if len(calls) == 2:
            raise RuntimeError("export process died after writing files, before moving the cursor")
        return out

    monkeypatch.setattr(export_job, "_write_chunk", write_then_crash)
    with pytest.raises(RuntimeError, match="died"):
        export_job.export_events(settings, chunk=7)
    monkeypatch.setattr(export_job, "_write_chunk", real_write)
    summary = export_job.export_events(settings, chunk=5)  # another chunk size on the re-run
    again = export_job.export_events(settings)

    exported = pd.read_parquet(settings.paths.events_dir)
    assert exported["event_id"].is_unique
    assert set(exported["event_id"]) == acked
    assert again["exported"] == 0
    # No consumer group yet: it will read from the start, so export trims nothing.
    assert summary["stream_length"] == len(acked) == stack["redis"].xlen(settings.redis.stream_key)


def test_export_outlasts_a_redis_outage_by_retrying(stack):
    """An export that finds Redis down (restart, or a stall behind an append-only-file
    rewrite) retries with backoff and lands every acknowledged event exactly once."""
    import threading

    from jobs.export_events import export_events

    http, headers, settings = stack["http"], bearer(stack, "ingest"), stack["settings"]
    export_events(settings)  # earlier tests' events
    batch = [event(user_id="outage-user") for _ in range(MAX_BATCH)]
    assert http.post("/v1/events", json={"events": batch}, headers=headers).status_code == 200
    stack["server"].stop()
    restart = threading.Timer(1.0, stack["server"].start)
    restart.start()
    try:
        summary = export_events(settings, backoff_s=0.4)
    finally:
        restart.join()
    exported = pd.read_parquet(settings.paths.events_dir)
    assert summary["exported"] == len(batch)
    assert exported["event_id"].is_unique and {e["event_id"] for e in batch} <= set(exported["event_id"])


def test_redis_down_is_503_with_retry_after_and_nothing_acknowledged(stack):
    http, headers = stack["http"], bearer(stack, "ingest")
    e = event(user_id="outage-user")
    stack["server"].stop()
    try:
        resp = http.post("/v1/events", json={"events": [e]}, headers=headers)
        assert resp.status_code == 503 and resp.headers["Retry-After"] == str(stack["settings"].gateway.unavailable_retry_after_s)
    finally:
        stack["server"].start()
    retry = http.post("/v1/events", json={"events": [e]}, headers=headers)
    assert retry.status_code == 200 and retry.json()["results"][0]["status"] == "accepted"


def test_ingestion_through_the_gateway_deployment_answers_the_same(stack):
    """`gateway.in_process: false` (ingress -> EventGateway deployment): same statuses, same 422,
    and the dedup it shares with the in-process path through Redis."""
    from ray import serve

    from deployments.gateway import EventGateway
    from deployments.ingress import ApiIngress

    settings = stack["settings"].model_copy(update={"gateway": stack["settings"].gateway.model_copy(update={"in_process": False})})
    serve.run(ApiIngress.bind(settings, EventGateway.bind(settings), None, None, None), name=f"{APP}-hop", route_prefix=f"{PREFIX}-hop")
    try:
        headers = bearer(stack, "ingest")
        hop = httpx.Client(base_url=str(stack["http"].base_url).replace(PREFIX, f"{PREFIX}-hop"), timeout=30)
        a = event(user_id="hop-user")
        assert stack["http"].post("/v1/events", json=a, headers=headers).json()["accepted"] == 1
        before = stream_len(stack)
        answer = hop.post("/v1/events", json={"events": [a, event(user_id="hop-user")]}, headers=headers).json()
        assert [r["status"] for r in answer["results"]] == ["duplicate", "accepted"]
        assert stream_len(stack) == before + 1
        bad = hop.post("/v1/events", json={"events": [{**a, "event_type": "teleport"}]}, headers=headers)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:3] == ["body", "events", 0]
        assert stream_len(stack) == before + 1
        hop.close()
    finally:
        serve.delete(f"{APP}-hop")
