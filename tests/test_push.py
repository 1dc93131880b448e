"""Web push: quiet hours and caps, subscription validation, the VAPID key CLI, and the notify
job end to end against a test push service on loopback, whose received payload the test
decrypts with the subscription's own keys (RFC 8291, aes128gcm)."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import http_ece
import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pydantic import ValidationError

from app.config import settings_from_args
from app.keys import Keys
from app.push.policy import cap_reason, in_quiet_hours
from app.push.subscriptions import SubscriptionRequest, SubscriptionStore, endpoint_problem, subscription_id
from app.push.vapid import b64url, b64url_decode, ensure_vapid_keys, load_vapid_keys, vapid_key_path
from tests.web_support import publish_tiny_catalogue

UTC = timezone.utc


# ---------- policy: pure functions of the clock ----------

def test_quiet_hours_are_the_listeners_local_night():
    now = datetime(2026, 6, 1, 23, 30, tzinfo=UTC)
    assert in_quiet_hours(now, "Europe/Berlin", 22, 8)  # 01:30 in Berlin
    assert not in_quiet_hours(now, "America/Los_Angeles", 22, 8)  # 16:30 in Los Angeles
    assert in_quiet_hours(datetime(2026, 6, 1, 5, 0, tzinfo=UTC), "UTC", 22, 8)
    assert not in_quiet_hours(datetime(2026, 6, 1, 8, 0, tzinfo=UTC), "UTC", 22, 8)
    assert in_quiet_hours(datetime(2026, 6, 1, 13, 0, tzinfo=UTC), "UTC", 12, 14)  # a span that does not cross midnight
    assert not in_quiet_hours(now, "UTC", 6, 6)  # equal start and end: no quiet hours


def test_frequency_cap_limits_per_day_and_spacing():
    now = 10 * 24 * 3600 * 1000
    hour = 3600 * 1000
    assert cap_reason([], now, max_per_day=2, min_interval_s=3600) is None
    assert "cap 2" in cap_reason([now - 5 * hour, now - 3 * hour], now, 2, 3600)
    assert "ago" in cap_reason([now - hour // 2], now, 2, 3600)
    assert cap_reason([now - 25 * hour, now - 26 * hour], now, 2, 3600) is None  # older than a day


# ---------- subscriptions: validated at the door ----------

def browser_keys() -> tuple[ec.EllipticCurvePrivateKey, bytes, dict]:
    """What a browser makes when it subscribes: a P-256 key pair and a 16-byte auth secret."""
    private = ec.generate_private_key(ec.SECP256R1())
    public = private.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    auth = os.urandom(16)
    return private, auth, {"p256dh": b64url(public), "auth": b64url(auth)}


def subscription_body(endpoint: str, user: str = "u1", **extra) -> dict:
    return {"user_id": user, "subscription": {"endpoint": endpoint, "expirationTime": None, "keys": browser_keys()[2]}, **extra}


def test_bad_subscriptions_name_the_field():
    body = subscription_body("https://fcm.googleapis.com/fcm/send/x")
    body["subscription"]["keys"]["p256dh"] = b64url(b"\x04" + b"1" * 10)
    with pytest.raises(ValidationError) as err:
        SubscriptionRequest.model_validate(body)
    assert err.value.errors()[0]["loc"] == ("subscription", "keys", "p256dh")
    with pytest.raises(ValidationError) as err:
        SubscriptionRequest.model_validate(subscription_body("https://fcm.googleapis.com/x", timezone="Mars/Olympus"))
    assert err.value.errors()[0]["loc"] == ("timezone",)


def test_endpoints_must_be_allowed_push_services():
    hosts = ["fcm.googleapis.com", "push.services.mozilla.com", "127.0.0.1"]
    assert endpoint_problem("https://fcm.googleapis.com/fcm/send/abc", hosts) is None
    assert endpoint_problem("https://updates.push.services.mozilla.com/wpush/v2/x", hosts) is None
    assert "not an allowed" in endpoint_problem("https://169.254.169.254/latest", hosts)
    assert "not an allowed" in endpoint_problem("https://evil-fcm.googleapis.com.example/x", hosts)
    assert "https" in endpoint_problem("http://fcm.googleapis.com/x", hosts)
    assert endpoint_problem("http://127.0.0.1:9/push", hosts) is None  # a loopback test service


def test_endpoints_the_http_client_would_read_differently_are_refused():
    """The host checked must be the host pywebpush's requests connects to (urllib3's reading)."""
    hosts = ["fcm.googleapis.com", "127.0.0.1"]
    # urlsplit reads fcm.googleapis.com, urllib3 connects to 10.0.0.5.
    assert "backslash" in endpoint_problem("https://10.0.0.5\\@fcm.googleapis.com/x", hosts)
    assert "user:password@" in endpoint_problem("https://a:b@fcm.googleapis.com/x", hosts)
    assert "user:password@" in endpoint_problem("https://10.0.0.5;@fcm.googleapis.com/x", hosts)
    assert "user:password@" in endpoint_problem("https://@fcm.googleapis.com/x", hosts)
    assert "ambiguous" in endpoint_problem("https://fcm%2egoogleapis.com/x", hosts)  # urllib3 decodes it, urlsplit does not
    assert "control characters" in endpoint_problem("https://fcm.googleapis.com\t/x", hosts)
    assert "not a valid URL" in endpoint_problem("https://fcm.googleapis.com:abc/x", hosts)
    assert "default port" in endpoint_problem("https://fcm.googleapis.com:8443/x", hosts)
    assert "user:password@" in endpoint_problem("https://fcm.googleapis.com%2f@10.0.0.5/", hosts)
    assert endpoint_problem("https://fcm.googleapis.com:443/fcm/send/abc", hosts) is None
    assert endpoint_problem("https://fcm.googleapis.com/x?a=b@c", hosts) is None  # an @ in the query is not userinfo
    assert endpoint_problem("http://127.0.0.1:8080/push/device", hosts) is None  # the loopback test service keeps its port


def test_sender_reports_a_subscription_it_cannot_sign_for_as_a_failure(tmp_path):
    """py_vapid refuses an audience with user:password@ in it; that must not escape the sender."""
    from app.push.sender import WebPushSender

    keys = ensure_vapid_keys(tmp_path / "vapid.pem")
    send = WebPushSender(keys.private_key_path, "mailto:ops@echotune.invalid", ttl_s=60, timeout_s=1.0)
    subscription = {"endpoint": "https://a:b@fcm.googleapis.com/x", "keys": browser_keys()[2]}
    assert send(subscription, b"{}") == 0


def test_store_replaces_the_oldest_device_beyond_the_limit(redis_client):
    store = SubscriptionStore(redis_client, Keys("pt"), max_per_user=2)
    for i in range(3):
        store.add(SubscriptionRequest.model_validate(subscription_body(f"https://fcm.googleapis.com/d{i}", genres=["rock"])))
    endpoints = {rec["subscription"]["endpoint"] for _, rec in store.subscriptions("u1")}
    assert len(endpoints) == 2 and "https://fcm.googleapis.com/d0" not in endpoints
    assert store.users() == ["u1"] and store.profile("u1")["genres"] == ["rock"]


class BeforeCall:
    """The real Redis client, with `action` run once just before the first call of `method`:
    a deterministic interleaving of two stores' commands, no threads, no timing."""

    def __init__(self, client, method: str, action):
        self._client, self._method, self._action = client, method, action

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if name != self._method or self._action is None:
            return attr
        action, self._action = self._action, None
        action()
        return attr


def test_a_device_added_while_the_last_one_is_removed_stays_in_the_walk(redis_client):
    keys = Keys("pt")
    SubscriptionStore(redis_client, keys).add(SubscriptionRequest.model_validate(subscription_body("https://fcm.googleapis.com/old")))
    old_id = subscription_id("https://fcm.googleapis.com/old")
    new_device = SubscriptionRequest.model_validate(subscription_body("https://fcm.googleapis.com/new"))

    # The new device arrives after remove() found the hash empty, before it leaves the walk.
    adding = SubscriptionStore(redis_client, keys)
    racing = SubscriptionStore(BeforeCall(redis_client, "srem", lambda: adding.add(new_device)), keys)
    racing.remove("u1", old_id)
    assert [rec["subscription"]["endpoint"] for _, rec in adding.subscriptions("u1")] == ["https://fcm.googleapis.com/new"]
    assert adding.users() == ["u1"]

    # The other way round: add() joined the walk, then the last device left before its MULTI.
    removing = SubscriptionStore(redis_client, keys)
    newest = SubscriptionRequest.model_validate(subscription_body("https://fcm.googleapis.com/newest"))
    racing = SubscriptionStore(BeforeCall(redis_client, "pipeline", lambda: removing.remove("u1", subscription_id("https://fcm.googleapis.com/new"))), keys)
    racing.add(newest)
    assert [rec["subscription"]["endpoint"] for _, rec in removing.subscriptions("u1")] == ["https://fcm.googleapis.com/newest"]
    assert removing.users() == ["u1"]


def test_removing_the_last_device_leaves_the_walk(redis_client):
    store = SubscriptionStore(redis_client, Keys("pt"))
    store.add(SubscriptionRequest.model_validate(subscription_body("https://fcm.googleapis.com/only")))
    assert store.remove_endpoint("u1", "https://fcm.googleapis.com/only") is True
    assert store.remove_endpoint("u1", "https://fcm.googleapis.com/only") is False
    assert store.users() == [] and store.subscriptions("u1") == []


# ---------- VAPID keys and the CLI ----------

def test_push_keys_cli_creates_the_key_once_owner_only(tmp_path, capsys):
    from app.cli import main

    config = tmp_path / "ray_config.yaml"
    config.write_text(json.dumps({"applications": [{"name": "echotune", "import_path": "deployments.app:build_app", "args": {"paths": {"state_dir": str(tmp_path)}}}]}))
    assert main(["--config", str(config), "push", "keys"]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["--config", str(config), "push", "keys"]) == 0
    assert capsys.readouterr().out.strip() == first  # kept: rotating would orphan every subscription
    path = tmp_path / "push" / "vapid_private.pem"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert len(b64url_decode(first)) == 65 and load_vapid_keys(path).public_key == first
    assert main(["--config", str(config), "push", "keys", "--rotate"]) == 0
    assert capsys.readouterr().out.strip() != first


# ---------- the notify job against a loopback push service ----------

class PushService:
    """A push service on loopback: records every request, answers per path (201 by default)."""

    def __init__(self):
        self.received: list[dict] = []
        self.status: dict[str, int] = {}
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                service.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(service.status.get(self.path, 201))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def push_service():
    service = PushService()
    yield service
    service.close()


@pytest.fixture
def push_settings(tmp_path, redis_server, redis_client):
    settings = settings_from_args(
        {
            "redis": {"url": redis_server.url, "key_prefix": "pushtest"},
            "paths": {"state_dir": str(tmp_path)},
            "push": {"endpoint_hosts": ["127.0.0.1"], "quiet_start_hour": 22, "quiet_end_hour": 8, "max_per_day": 2, "min_interval_s": 3600},
        }
    )
    publish_tiny_catalogue(settings)  # trending lists: genre:rock holds t000, t002, t004
    ensure_vapid_keys(vapid_key_path(settings))
    return settings


def subscribe(settings, client, endpoint, user="u1", tz="Europe/Berlin"):
    private, auth, keys = browser_keys()
    body = {"user_id": user, "subscription": {"endpoint": endpoint, "keys": keys}, "timezone": tz, "genres": ["rock"]}
    SubscriptionStore(client, Keys(settings.redis.key_prefix)).add(SubscriptionRequest.model_validate(body))
    return private, auth


def verified_es256_claims(token: str, public_key: ec.EllipticCurvePublicKey) -> dict:
    """The claims of an ES256 JWT after checking its signature (raises if it is not ours)."""
    header, payload, signature = token.split(".")
    raw = b64url_decode(signature)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public_key.verify(der, f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    assert json.loads(b64url_decode(header))["alg"] == "ES256"
    return json.loads(b64url_decode(payload))


NOON_BERLIN = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)


def test_notify_sends_trend_news_the_subscriber_can_decrypt(push_settings, redis_client, push_service):
    from jobs.notify import notify

    private, auth = subscribe(push_settings, redis_client, f"{push_service.url}/push/device-1")
    report = notify(push_settings, clock=lambda: NOON_BERLIN)
    assert report.as_dict()["sent"] == 1 and report.deliveries == 1

    (request,) = push_service.received
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert request["path"] == "/push/device-1"
    assert headers["content-encoding"] == "aes128gcm"
    assert int(headers["ttl"]) == push_settings.push.message_ttl_s
    # RFC 8292: a JWT for this push service's origin, signed by our VAPID key.
    scheme, _, params = headers["authorization"].partition(" ")
    fields = dict(p.strip().split("=", 1) for p in params.split(","))
    assert scheme == "vapid" and fields["k"] == load_vapid_keys(vapid_key_path(push_settings)).public_key
    vapid_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(fields["k"]))
    claims = verified_es256_claims(fields["t"], vapid_public)
    assert claims["aud"] == push_service.url and claims["exp"] > NOON_BERLIN.timestamp()
    assert claims["sub"] == "mailto:ops@echotune.invalid"
    # RFC 8291: only the holder of the subscription's private key and auth secret can read it.
    plain = http_ece.decrypt(request["body"], private_key=private, auth_secret=auth, version="aes128gcm")
    message = json.loads(plain)
    assert message["title"] == "New trending in rock"
    assert [t["track_id"] for t in message["tracks"]] == ["t000", "t002", "t004"]
    assert all(t["genre"] == "rock" for t in message["tracks"])

    # The same trends are news once, and the frequency cap holds back a second message.
    again = notify(push_settings, clock=lambda: NOON_BERLIN.replace(hour=13))
    assert again.as_dict().get("sent", 0) == 0 and len(push_service.received) == 1


def test_quiet_hours_and_caps_hold_messages_back(push_settings, redis_client, push_service):
    from jobs.notify import notify

    subscribe(push_settings, redis_client, f"{push_service.url}/push/night-owl", tz="Europe/Berlin")
    night_in_berlin = datetime(2026, 6, 1, 22, 30, tzinfo=UTC)  # 00:30 local
    assert notify(push_settings, clock=lambda: night_in_berlin).as_dict()["quiet_hours"] == 1
    assert push_service.received == []
    redis_client.zadd(Keys("pushtest").push_sent("u1"), {"earlier": NOON_BERLIN.timestamp() * 1000 - 60_000})
    assert notify(push_settings, clock=lambda: NOON_BERLIN).as_dict()["capped"] == 1
    assert push_service.received == []


def test_gone_subscriptions_are_pruned(push_settings, redis_client, push_service):
    from jobs.notify import notify

    push_service.status = {"/push/gone": 410, "/push/unknown": 404, "/push/flaky": 500}
    for path in ("gone", "unknown", "flaky", "fine"):
        subscribe(push_settings, redis_client, f"{push_service.url}/push/{path}")
    report = notify(push_settings, clock=lambda: NOON_BERLIN)
    assert (report.pruned, report.failed, report.deliveries) == (2, 1, 1)
    store = SubscriptionStore(redis_client, Keys("pushtest"))
    left = sorted(rec["subscription"]["endpoint"].rsplit("/", 1)[1] for _, rec in store.subscriptions("u1"))
    assert left == ["fine", "flaky"]  # a 500 is kept for the next run


def test_one_listener_that_fails_does_not_stop_the_walk(redis_client):
    """Listeners are walked in sorted order: a failure at u1 must not starve u2 and u3."""
    from app.config import PushSettings
    from app.push.notifier import TrendNotifier

    store = SubscriptionStore(redis_client, Keys("pt"))
    for user in ("u1", "u2", "u3"):
        store.add(SubscriptionRequest.model_validate(subscription_body(f"https://fcm.googleapis.com/{user}", user=user, genres=["rock"])))
    sent_to = []

    def send(subscription: dict, payload: bytes) -> int:
        if subscription["endpoint"].endswith("/u1"):
            raise RuntimeError("a bug in one subscription's path")
        sent_to.append(subscription["endpoint"].rsplit("/", 1)[1])
        return 201

    settings = PushSettings(endpoint_hosts=["fcm.googleapis.com"], quiet_start_hour=0, quiet_end_hour=0)
    report = TrendNotifier(store, lambda genre, k: [{"track_id": "t1"}], send, settings, clock=lambda: NOON_BERLIN).run()
    assert sent_to == ["u2", "u3"]
    assert report.as_dict() == {"users": 3, "error": 1, "sent": 2, "deliveries": 2, "pruned": 0, "failed": 0}


def test_a_stored_endpoint_the_check_now_refuses_is_never_sent_to(redis_client):
    """Subscriptions stored before the endpoint check was tightened never reach the sender;
    they are kept (a slip in push.endpoint_hosts must not delete everyone's subscriptions)."""
    from app.config import PushSettings
    from app.push.notifier import TrendNotifier

    keys = Keys("pt")
    store = SubscriptionStore(redis_client, keys)
    store.add(SubscriptionRequest.model_validate(subscription_body("https://fcm.googleapis.com/good", genres=["rock"])))
    hostile = "https://10.0.0.5\\@fcm.googleapis.com/x"  # what urlsplit alone let through
    record = {"subscription": {"endpoint": hostile, "keys": browser_keys()[2]}, "created_at_ms": 0, "seq": 0}
    redis_client.hset(keys.push_subscriptions("u1"), subscription_id(hostile), json.dumps(record))
    sent_to = []

    def send(subscription: dict, payload: bytes) -> int:
        sent_to.append(subscription["endpoint"])
        return 201

    settings = PushSettings(endpoint_hosts=["fcm.googleapis.com"], quiet_start_hour=0, quiet_end_hour=0)
    report = TrendNotifier(store, lambda genre, k: [{"track_id": "t1"}], send, settings, clock=lambda: NOON_BERLIN).run()
    assert sent_to == ["https://fcm.googleapis.com/good"]
    assert (report.failed, report.pruned, report.deliveries) == (1, 0, 1)


# ---------- the HTTP route on the Serve app ----------

@pytest.mark.ray
def test_subscription_route_needs_a_key_and_stores_the_device(web_app):
    import redis

    from app.events.auth import ApiKeyStore

    settings = web_app["settings"]
    client = redis.Redis.from_url(web_app["settings"].redis.url)
    keys = Keys(settings.redis.key_prefix)
    read_only = ApiKeyStore(client, keys).create({"read"}).token
    listener = ApiKeyStore(client, keys).create({"ingest", "read"}).token
    body = subscription_body("http://127.0.0.1:9/push/route", user="route-user", timezone="Asia/Tokyo", genres=["jazz"])
    with httpx.Client(base_url=web_app["base"], timeout=30) as api:
        assert api.post("/v1/push/subscriptions", json=body).status_code == 401
        assert api.post("/v1/push/subscriptions", json=body, headers={"Authorization": f"Bearer {read_only}"}).status_code == 403
        auth = {"Authorization": f"Bearer {listener}"}
        bad = dict(body, subscription=dict(body["subscription"], endpoint="https://metadata.internal/x"))
        resp = api.post("/v1/push/subscriptions", json=bad, headers=auth)
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "subscription", "endpoint"]
        resp = api.post("/v1/push/subscriptions", json=body, headers=auth)
        assert resp.status_code == 201, resp.text
        key = api.get("/v1/push/vapid-public-key", headers=auth).json()["public_key"]
    assert key == load_vapid_keys(vapid_key_path(settings)).public_key
    store = SubscriptionStore(client, keys)
    assert "route-user" in store.users()
    assert store.profile("route-user") == {"timezone": "Asia/Tokyo", "genres": ["jazz"]}


@pytest.mark.ray
def test_subscription_route_refuses_endpoints_the_http_client_would_read_differently(web_app):
    import redis

    from app.events.auth import ApiKeyStore

    settings = web_app["settings"]
    client = redis.Redis.from_url(settings.redis.url)
    auth = {"Authorization": f"Bearer {ApiKeyStore(client, Keys(settings.redis.key_prefix)).create({'ingest', 'read'}).token}"}
    hosts = settings.push.endpoint_hosts  # 127.0.0.1: each endpoint below would aim the notifier elsewhere
    with httpx.Client(base_url=web_app["base"], timeout=30) as api:
        for endpoint in ("http://10.0.0.5\\@127.0.0.1:9/x", "http://a:b@127.0.0.1:9/x", "http://127%2e0.0.1:9/x"):
            assert endpoint_problem(endpoint, hosts)
            resp = api.post("/v1/push/subscriptions", json=subscription_body(endpoint, user="hostile"), headers=auth)
            assert resp.status_code == 422, endpoint
            assert resp.json()["detail"][0]["loc"] == ["body", "subscription", "endpoint"]
    assert "hostile" not in SubscriptionStore(client, Keys(settings.redis.key_prefix)).users()


@pytest.mark.ray
def test_unsubscribe_route_forgets_only_the_device_named(web_app):
    import redis

    from app.events.auth import ApiKeyStore

    settings = web_app["settings"]
    client = redis.Redis.from_url(settings.redis.url)
    keys = Keys(settings.redis.key_prefix)
    auth = {"Authorization": f"Bearer {ApiKeyStore(client, keys).create({'ingest', 'read'}).token}"}  # a listener's key
    kept, leaving = "http://127.0.0.1:9/push/kept", "http://127.0.0.1:9/push/leaving"
    with httpx.Client(base_url=web_app["base"], timeout=30) as api:
        for endpoint in (kept, leaving):
            assert api.post("/v1/push/subscriptions", json=subscription_body(endpoint, user="leaver"), headers=auth).status_code == 201
        gone = api.request("DELETE", "/v1/push/subscriptions", json={"user_id": "leaver", "endpoint": leaving}, headers=auth)
        assert gone.status_code == 204, gone.text
        again = api.request("DELETE", "/v1/push/subscriptions", json={"user_id": "leaver", "endpoint": leaving}, headers=auth)
        assert again.status_code == 404
        bad = api.request("DELETE", "/v1/push/subscriptions", json={"user_id": "leaver"}, headers=auth)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "endpoint"]
        assert api.request("DELETE", "/v1/push/subscriptions", json={"user_id": "leaver", "endpoint": kept}).status_code == 401
    store = SubscriptionStore(client, keys)
    assert [rec["subscription"]["endpoint"] for _, rec in store.subscriptions("leaver")] == [kept]
    assert "leaver" in store.users()
