"""Enrichment, sessions, API keys and rate limits against a real Redis (no Ray)."""

import uuid
from datetime import datetime, timedelta, timezone

import pytest
import redis
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from app.config import AuthSettings, GatewaySettings, RateLimitSettings, ScopeLimit
from app.events.auth import ApiKeyStore, RequestGuard, api_key_dependency, required_scope
from app.events.enrichment import RequestContext, device_type, normalise_locale, preferred_locale
from app.events.ingest import EventIngestor, StorageUnavailable
from app.events.rate_limit import RateDecision, TokenBucketLimiter
from app.events.stream import EventStream
from app.keys import Keys
from app.redis_server import free_port
from app.schemas import EventStatus

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def event(minute: int, user: str = "u1", **over) -> dict:
    ts = (NOW - timedelta(hours=3) + timedelta(minutes=minute)).isoformat()
    return {"event_id": str(uuid.uuid4()), "user_id": user, "track_id": "t1", "event_type": "play", "timestamp": ts, **over}


def ingestor(client) -> EventIngestor:
    return EventIngestor(EventStream(client, "s", "dedup:", session_prefix="sess:", session_gap_s=1800), GatewaySettings())


@pytest.mark.parametrize(
    "ua, device",
    [
        ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148", "mobile"),
        ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/120 Mobile Safari/537.36", "mobile"),
        ("Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15", "tablet"),
        ("Mozilla/5.0 (Linux; Android 13; SM-X200) AppleWebKit/537.36 Chrome/120 Safari/537.36", "tablet"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120 Safari/537.36", "desktop"),
        ("Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 SamsungBrowser/4.0 TV Safari/537.36", "tv"),
        ("Roku/DVP-12.0 (12.0.0.4182-88)", "tv"),
        ("Mozilla/5.0 (Linux; Android 9; AFTMM Build/PS7633) AppleWebKit/537.36 Chrome/120 Safari/537.36", "tv"),
        ("Mozilla/5.0 (Linux; Android 11; AFTKA Build/RS8149) AppleWebKit/537.36 Chrome/120 Safari/537.36", "tv"),
        ("Mozilla/5.0 (Linux; Android 9; AFTSSS Build/PS7633) AppleWebKit/537.36 Chrome/120 Safari/537.36", "tv"),
        ("Mozilla/5.0 (Linux; Android 7.1.2; AFTT Build/NS6296) AppleWebKit/537.36 Chrome/120 Safari/537.36", "tv"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120 Safari/537.36 Crafts/2.0", "desktop"),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
        ("python-httpx/0.28.1", "bot"),
        (None, None),
    ],
)
def test_device_type_from_user_agent(ua, device):
    assert device_type(ua) == device


def test_locale_prefers_highest_q_and_normalises():
    assert preferred_locale("fr;q=0.5, en_us;q=0.9, *;q=1") == "en-US"
    assert preferred_locale("de-DE") == "de-DE"
    assert preferred_locale("not a tag!!") is None and preferred_locale(None) is None


@pytest.mark.parametrize("tag", ["zh-Hant-TW", "zh-hant-tw", "ZH-HANT-TW", "zh_hant_TW"])
def test_one_locale_in_any_case_is_one_canonical_tag(tag):
    assert normalise_locale(tag) == "zh-Hant-TW"


@pytest.mark.parametrize(
    "tag, canonical",
    [("SR-LATN-rs", "sr-Latn-RS"), ("es-419", "es-419"), ("DE-ch-1996", "de-CH-1996"), ("sl-ROZAJ", "sl-rozaj")],
)
def test_locale_subtags_take_bcp47_canonical_case(tag, canonical):
    assert normalise_locale(tag) == canonical


@pytest.mark.parametrize("bad_q", ["inf", "1.5", "-0.1", "nan", "abc", ""])
def test_an_accept_language_weight_outside_0_to_1_is_ignored(bad_q):
    assert preferred_locale(f"fr;q={bad_q}, en-GB;q=0.5") == "en-GB"


def test_enrichment_adds_device_locale_receive_time_and_version(redis_client):
    ing = ingestor(redis_client)
    ctx = RequestContext.from_headers("Mozilla/5.0 (iPad; CPU OS 17_0)", "pt-BR,pt;q=0.8", received_at_ms=42)
    ing.ingest({"events": [event(0), event(1, locale="sv_se")]}, ctx, NOW)
    first, second = (e.event for e in ing.stream.read())
    assert first["device_type"] == "tablet" and first["locale"] == "pt-BR"
    assert second["locale"] == "sv-SE", "the event's own locale wins over Accept-Language"
    assert first["received_at_ms"] == 42 and first["schema_version"] == 1 and first["session_id"]


def test_sessions_split_after_30_minutes_of_inactivity_per_user(redis_client):
    ing = ingestor(redis_client)
    ctx = RequestContext(received_at_ms=0)
    ing.ingest({"events": [event(0), event(20), event(45), event(80), event(5, user="u2")]}, ctx, NOW)
    ing.ingest({"events": [event(100)]}, ctx, NOW)  # state carries across requests
    sids = [e.event["session_id"] for e in ing.stream.read()]
    assert sids[0] == sids[1] == sids[2], "gaps of 20 and 25 minutes stay in one session"
    assert sids[3] != sids[2], "a 35-minute gap starts a new session"
    assert sids[5] == sids[3]
    assert sids[4] not in sids[:4], "sessions are per user"


def test_late_events_sent_together_share_sessions_and_leave_the_current_one(redis_client):
    """A device that queued plays offline while the listener played on elsewhere sends them
    late, in one request: they form their own sessions by the same gap (here slightly out of
    order), instead of one session per event."""
    ing = ingestor(redis_client)
    ctx = RequestContext(received_at_ms=0)
    ing.ingest({"events": [event(170)]}, ctx, NOW)
    ing.ingest({"events": [event(10), event(0), event(20), event(100), event(110), event(5, user="u2")]}, ctx, NOW)
    ing.ingest({"events": [event(175)]}, ctx, NOW)
    current, m10, m0, m20, m100, m110, _, m175 = [e.event["session_id"] for e in ing.stream.read()]
    assert m0 == m10 == m20, "plays 10 minutes apart are one session"
    assert m100 == m110 and m100 != m0, "a gap of 80 minutes starts another"
    assert current not in (m0, m100)
    assert m175 == current, "the late plays did not move the listener's current session back"


def test_retry_is_duplicate_and_reused_id_is_rejected_with_reason(redis_client):
    ing = ingestor(redis_client)
    ctx = RequestContext(received_at_ms=0)
    a, b = event(0), event(1)
    first = ing.ingest({"events": [a, b]}, ctx, NOW)
    again = ing.ingest({"events": [a, {**b, "track_id": "other"}, event(2)]}, ctx, NOW)
    assert (first.accepted, first.duplicates, first.rejected) == (2, 0, 0)
    assert [r.status for r in again.results] == [EventStatus.duplicate, EventStatus.rejected, EventStatus.accepted]
    assert "different event" in again.results[1].reason
    assert (again.accepted, again.duplicates, again.rejected) == (1, 1, 1)
    assert ing.stream.length() == 3


def test_redis_down_raises_storage_unavailable_and_acknowledges_nothing():
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    with pytest.raises(StorageUnavailable):
        ingestor(dead).ingest(event(0), RequestContext(received_at_ms=0), NOW)


def test_key_store_keeps_only_salted_hashes_and_revokes(redis_client):
    store = ApiKeyStore(redis_client, Keys("kt"))
    created = store.create({"ingest", "read"}, name="web")
    dump = b"".join(k + b"".join(redis_client.hgetall(k).values()) for k in redis_client.keys("*"))
    assert created.token.encode() not in dump and created.token.split("_")[-1].encode() not in dump
    principal = store.verify(created.token)
    assert principal.key_id == created.key_id and principal.allows("read") and not principal.allows("admin")
    assert store.verify(created.token[:-1] + ("A" if created.token[-1] != "A" else "B")) is None
    assert store.verify("etk_nope_nope") is None and store.verify("garbage") is None
    assert store.revoke(created.key_id) and store.verify(created.token) is None
    assert not store.revoke("no-such-key")
    with pytest.raises(ValueError):
        store.create({"superuser"})


def test_rate_limiter_allows_exactly_the_burst_then_asks_to_retry(redis_client):
    limiter = TokenBucketLimiter(redis_client)
    decisions = [limiter.acquire("b", rate_per_s=0.01, burst=5) for _ in range(8)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert [d.retry_after_s for d in decisions[:5]] == [0] * 5  # no Retry-After for an allowed request


def test_retry_after_is_the_wait_rounded_up_to_whole_seconds_and_never_0_for_a_refusal():
    """`Retry-After` takes delay-seconds; a 0 would invite an immediate retry into the same 429."""
    waits_ms = [0, 1, 999, 1000, 1001, 100_000]
    assert [RateDecision(False, w).retry_after_s for w in waits_ms] == [1, 1, 1, 1, 2, 100]
    assert RateDecision(True, 0).retry_after_s == 0


def test_every_route_but_health_and_docs_needs_a_scoped_key(redis_client):
    assert required_scope("GET", "/healthz") is None and required_scope("GET", "/docs") is None
    assert required_scope("POST", "/v1/events") == "ingest"
    assert required_scope("GET", "/v1/trending") == "read"
    assert required_scope("DELETE", "/v1/anything") == "admin"

    store = ApiKeyStore(redis_client, Keys("kt"))
    limits = RateLimitSettings(read=ScopeLimit(rate_per_s=0.01, burst=2))
    guard = RequestGuard(store, TokenBucketLimiter(redis_client), limits, AuthSettings())
    app = FastAPI(dependencies=[Depends(api_key_dependency(lambda: guard))])
    app.get("/healthz")(lambda: {"ok": True})
    app.get("/v1/trending")(lambda: {"ok": True})
    app.post("/v1/events")(lambda: {"ok": True})
    http = TestClient(app)
    ingest = store.create({"ingest"}).token
    reader = store.create({"read"}).token

    assert http.get("/healthz").status_code == 200 and http.get("/openapi.json").status_code == 200
    assert http.post("/v1/events").status_code == 401
    assert http.post("/v1/events", headers={"Authorization": "Bearer etk_x_y"}).status_code == 401
    assert http.post("/v1/events", headers={"X-API-Key": reader}).status_code == 403
    assert http.post("/v1/events", headers={"Authorization": f"Bearer {ingest}"}).status_code == 200
    codes = [http.get("/v1/trending", headers={"X-API-Key": reader}) for _ in range(3)]
    assert [c.status_code for c in codes] == [200, 200, 429]
    assert codes[-1].headers["Retry-After"].isdigit()  # delay-seconds (RateDecision rounds it)


def test_cli_creates_and_revokes_keys(redis_server, redis_client, tmp_path, capsys):
    import yaml

    from app.cli import main

    config = tmp_path / "c.yaml"
    args = {"redis": {"url": redis_server.url, "key_prefix": "cli"}, "paths": {"state_dir": str(tmp_path)}}
    config.write_text(yaml.safe_dump({"applications": [{"name": "echotune", "import_path": "x:y", "args": args}]}))
    assert main(["--config", str(config), "keys", "create", "--scope", "ingest", "--scope", "read", "--name", "web"]) == 0
    token = capsys.readouterr().out.strip()
    store = ApiKeyStore(redis_client, Keys("cli"))
    principal = store.verify(token)
    assert principal.scopes == {"ingest", "read"}
    assert main(["--config", str(config), "keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert principal.key_id in listed and token not in listed
    assert main(["--config", str(config), "keys", "revoke", principal.key_id]) == 0
    assert store.verify(token) is None
    assert main(["--config", str(config), "keys", "revoke", "nope"]) == 1
