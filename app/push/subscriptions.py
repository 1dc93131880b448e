"""Listeners' web-push subscriptions in Redis, validated at the door.

A subscription is what `pushManager.subscribe()` returns in the browser: the push service's
endpoint URL plus the keys (p256dh, auth) the payload is encrypted to (RFC 8291). The server
later POSTs to that endpoint, so the endpoint's host must be an allowed push service.

    store = SubscriptionStore(client, Keys(prefix), max_per_user=10)
    store.add(SubscriptionRequest.model_validate(body))
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import time
from typing import Annotated
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from app.keys import Keys
from app.push.vapid import b64url_decode
from app.schemas import Id

DAY_MS = 24 * 3600 * 1000
ANNOUNCED_TTL_S = 30 * 24 * 3600  # a trend older than a month is no longer news anyway
DEFAULT_PORTS = {"https": 443, "http": 80}

Genre = Annotated[str, Field(min_length=1, max_length=64)]


def _b64url_bytes(value: str, field: str) -> bytes:
    try:
        return b64url_decode(value)
    except ValueError:
        raise ValueError(f"{field} must be base64url") from None


class PushKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")

    p256dh: str = Field(max_length=200)
    """The browser's P-256 public key (uncompressed point, base64url)."""
    auth: str = Field(max_length=100)
    """The 16-byte authentication secret (base64url)."""

    @field_validator("p256dh")
    @classmethod
    def _p256dh(cls, value: str) -> str:
        raw = _b64url_bytes(value, "p256dh")
        if len(raw) != 65 or raw[0] != 4:
            raise ValueError("p256dh must be an uncompressed P-256 point (65 bytes)")
        return value

    @field_validator("auth")
    @classmethod
    def _auth(cls, value: str) -> str:
        if len(_b64url_bytes(value, "auth")) != 16:
            raise ValueError("auth must be 16 bytes")
        return value


class PushSubscription(BaseModel):
    """`PushSubscription.toJSON()` as the browser produces it."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(min_length=8, max_length=2048)
    expirationTime: int | None = None
    keys: PushKeys


class SubscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    subscription: PushSubscription
    timezone: str = Field("UTC", max_length=64)
    """IANA time zone of the device (`Intl.DateTimeFormat().resolvedOptions().timeZone`):
    quiet hours are the listener's local night, not the server's."""
    genres: list[Genre] = Field(default_factory=list, max_length=20)
    """Genres the listener wants trend news about (the PWA sends those of their recommendations)."""

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name like Europe/Berlin") from None
        return value


class UnsubscribeRequest(BaseModel):
    """One device leaving push (the PWA sends it on sign-out). API keys are not tied to a
    listener, so the endpoint is the proof of ownership: an unguessable URL the push service
    gave that browser alone, never returned by any route."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id
    endpoint: str = Field(min_length=8, max_length=2048)


def endpoint_problem(endpoint: str, allowed_hosts: list[str]) -> str | None:
    """Why the server must not POST to this endpoint, or None. https to an allowed push
    service on its default port; plain http and other ports only to an allowed loopback host
    (a local test push service).

    The host checked must be the host connected to. Parsers disagree on odd URLs
    (`https://10.0.0.5\\@fcm.googleapis.com/` is fcm.googleapis.com to urlsplit but 10.0.0.5 to
    urllib3, which requests and so pywebpush use), so the URL is read with both and refused
    unless they agree; user:password@, backslashes and control characters, which no push
    service's endpoint has, are refused outright."""
    if "\\" in endpoint or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in endpoint):
        return "endpoint must not contain backslashes, spaces or control characters"
    parts = urlsplit(endpoint)
    try:
        seen = parse_url(endpoint)
        port = parts.port
    except (LocationParseError, ValueError):
        return "endpoint is not a valid URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "endpoint must be an http(s) URL"
    if "@" in parts.netloc or seen.auth is not None:
        return "endpoint must not carry user:password@"
    host = parts.hostname.lower()
    if (seen.host or "").strip("[]").lower() != host or seen.port != port:
        return "endpoint is ambiguous: its host reads differently to different URL parsers"
    allowed = any(host == h or host.endswith("." + h) for h in allowed_hosts)
    if not allowed:
        return f"endpoint host {host!r} is not an allowed push service"
    if parts.scheme == "http" and not _is_loopback(host):
        return "endpoint must use https"
    if port not in (None, DEFAULT_PORTS[parts.scheme]) and not _is_loopback(host):
        return f"endpoint must use the default port of {parts.scheme}"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def subscription_id(endpoint: str) -> str:
    return hashlib.sha256(endpoint.encode()).hexdigest()[:24]


class SubscriptionStore:
    def __init__(self, client: redis.Redis, keys: Keys, max_per_user: int = 10):
        self.client = client
        self.keys = keys
        self.max_per_user = max_per_user

    def add(self, request: SubscriptionRequest) -> tuple[str, int]:
        """Store (or refresh) one device's subscription; returns its id and the listener's
        device count. The same endpoint again replaces its record instead of adding one."""
        user = request.user_id
        sub_id = subscription_id(request.subscription.endpoint)
        # A per-listener sequence orders devices exactly; two adds in one millisecond would
        # otherwise tie on the clock and evict an arbitrary one.
        seq = int(self.client.incr(self.keys.push_sequence(user)))
        record = {"subscription": request.subscription.model_dump(), "created_at_ms": int(time.time() * 1000), "seq": seq}
        name = self.keys.push_subscriptions(user)
        # Join the notifier's walk first: a crash before the MULTI leaves a listener with no
        # device (the walk skips it), never a device the walk cannot reach. The MULTI's keys
        # share the listener's hash tag, so it also runs on a Redis Cluster.
        self.client.sadd(self.keys.push_users(), user)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(name, sub_id, json.dumps(record))
        pipe.hset(self.keys.push_profile(user), mapping={"timezone": request.timezone, "genres": json.dumps(request.genres)})
        pipe.execute()
        # And join again after it: a remove() of this listener's last device may have found
        # the hash empty and left the walk between the two (see remove()).
        self.client.sadd(self.keys.push_users(), user)
        subs = self.subscriptions(user)
        for old_id, _ in sorted(subs, key=lambda s: (s[1].get("seq", 0), s[1]["created_at_ms"]))[: max(0, len(subs) - self.max_per_user)]:
            self.remove(user, old_id)
        return sub_id, min(len(subs), self.max_per_user)

    def users(self) -> list[str]:
        return sorted(u.decode() for u in self.client.smembers(self.keys.push_users()))

    def subscriptions(self, user_id: str) -> list[tuple[str, dict]]:
        raw = self.client.hgetall(self.keys.push_subscriptions(user_id))
        return [(k.decode(), json.loads(v)) for k, v in raw.items()]

    def profile(self, user_id: str) -> dict:
        raw = {k.decode(): v.decode() for k, v in self.client.hgetall(self.keys.push_profile(user_id)).items()}
        return {"timezone": raw.get("timezone", "UTC"), "genres": json.loads(raw.get("genres", "[]"))}

    def sent_times_ms(self, user_id: str, since_ms: int) -> list[int]:
        """When the listener was notified since `since_ms` (the frequency cap's memory)."""
        return [int(score) for _, score in self.client.zrangebyscore(self.keys.push_sent(user_id), since_ms, "+inf", withscores=True)]

    def announced(self, user_id: str) -> set[str]:
        """Tracks the listener was already told about."""
        return {m.decode() for m in self.client.smembers(self.keys.push_announced(user_id))}

    def record_sent(self, user_id: str, now_ms: int, track_ids: list[str]) -> None:
        sent, announced = self.keys.push_sent(user_id), self.keys.push_announced(user_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(sent, {str(now_ms): now_ms})
        pipe.zremrangebyscore(sent, "-inf", now_ms - DAY_MS)
        pipe.expire(sent, 2 * DAY_MS // 1000)
        if track_ids:
            pipe.sadd(announced, *track_ids)
            pipe.expire(announced, ANNOUNCED_TTL_S)
        pipe.execute()

    def remove(self, user_id: str, sub_id: str) -> bool:
        """Forget one device (False: it was not there); a listener with no device left leaves
        the notifier's walk.

        The walk's set is one global key and the devices a per-listener hash tag, so on a Redis
        Cluster no MULTI or script may touch both. Instead each side looks again after its own
        write: this looks at the hash after leaving the set (and rejoins if a device arrived),
        add() joins after its MULTI. Whichever runs last sees the other's write, so a listener
        with a device is never left out of the walk."""
        name = self.keys.push_subscriptions(user_id)
        removed = bool(self.client.hdel(name, sub_id))
        if not self.client.hlen(name):
            self.client.srem(self.keys.push_users(), user_id)
            if self.client.hlen(name):
                self.client.sadd(self.keys.push_users(), user_id)
        return removed

    def remove_endpoint(self, user_id: str, endpoint: str) -> bool:
        """Forget the device with this endpoint (the browser unsubscribed, or signed out)."""
        return self.remove(user_id, subscription_id(endpoint))
