"""API keys with scopes, and the FastAPI dependency that guards every route but health and docs.

A key looks like `etk_<key_id>_<secret>`. Redis keeps only `key_id -> (salt, sha256(salt +
secret), scopes)`, so a dump of Redis does not reveal a usable key; the secret is shown once,
by `echotune keys create`. Secrets are 256 random bits, so a fast salted hash is enough (slow
KDFs exist for guessable passwords) and keeps verification off the request's critical path.

    store = ApiKeyStore(client, Keys(prefix))
    token = store.create({"ingest"}).token           # hand this to the client, once
    api = FastAPI(dependencies=[Depends(api_key_dependency(lambda: guard))])
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import redis
from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from app.config import AuthSettings, RateLimitSettings
from app.events.rate_limit import TokenBucketLimiter
from app.keys import Keys

log = logging.getLogger(__name__)

Scope = Literal["ingest", "read", "admin"]
SCOPES: tuple[str, ...] = ("ingest", "read", "admin")
TOKEN_PREFIX = "etk_"

# Paths anyone may call: liveness and the OpenAPI docs (docs are Starlette routes, not API
# routes, so an app-level dependency never runs for them; /healthz is an API route).
PUBLIC_PATHS = frozenset({"/healthz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
# The PWA's demo sign-in mints keys, so it cannot need one; it is off unless web.demo_sign_in
# and limits itself per client address (deployments/web.py). The PWA's files under /app are a
# mounted sub-app, public like the docs.
SIGN_IN_PATHS = frozenset({"/v1/web/sign-in"})
# Routes a listener's own client calls with the ingest scope, like posting its events.
INGEST_ROUTES = frozenset({("POST", "/v1/events"), ("POST", "/v1/push/subscriptions"), ("DELETE", "/v1/push/subscriptions")})


def required_scope(method: str, path: str) -> Scope | None:
    """The scope a route needs. Fail closed: anything not known to be ingest or read is admin."""
    if path in PUBLIC_PATHS or path in SIGN_IN_PATHS:
        return None
    if (method, path) in INGEST_ROUTES:
        return "ingest"
    if method in ("GET", "HEAD"):
        return "read"
    return "admin"


@dataclass(frozen=True)
class Principal:
    key_id: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


@dataclass(frozen=True)
class CreatedKey:
    key_id: str
    token: str
    scopes: frozenset[str]


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def split_token(token: str) -> tuple[str, str] | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    key_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    # Only well-formed ids reach Redis (ids are 16 hex digits; see create).
    if not (sep and secret and len(key_id) == 16 and all(c in "0123456789abcdef" for c in key_id)):
        return None
    return key_id, secret


class ApiKeyStore:
    """Salted-hash API key records in Redis, with a short read-through cache per process."""

    def __init__(self, client: redis.Redis, keys: Keys, cache_ttl_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.keys = keys
        self.cache_ttl_s = cache_ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, dict[bytes, bytes]]] = {}
        # Last record Redis returned per key id: lets reads keep working through an outage.
        self._known: dict[str, dict[bytes, bytes]] = {}

    def create(self, scopes: Iterable[str], name: str = "") -> CreatedKey:
        scopes = frozenset(scopes)
        unknown = scopes - set(SCOPES)
        if not scopes or unknown:
            raise ValueError(f"scopes must be a non-empty subset of {SCOPES}, got {sorted(scopes)}")
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32).replace("_", "-")  # '_' separates the parts
        salt = secrets.token_bytes(16)
        record = {
            "salt": salt.hex(),
            "hash": _digest(salt, secret).hex(),
            "scopes": ",".join(sorted(scopes)),
            "name": name,
            "created_at_ms": str(int(time.time() * 1000)),
        }
        if not self.client.hsetnx(self.keys.api_key(key_id), "hash", record["hash"]):
            raise RuntimeError("key id collision; try again")
        self.client.hset(self.keys.api_key(key_id), mapping=record)
        log.info("created API key %s with scopes %s", key_id, record["scopes"])
        return CreatedKey(key_id=key_id, token=f"{TOKEN_PREFIX}{key_id}_{secret}", scopes=scopes)

    def revoke(self, key_id: str) -> bool:
        """Mark a key revoked (the record stays for audit). False if there is no such key."""
        name = self.keys.api_key(key_id)
        if not self.client.exists(name):
            return False
        self.client.hset(name, "revoked_at_ms", str(int(time.time() * 1000)))
        self._cache.pop(key_id, None)
        log.info("revoked API key %s", key_id)
        return True

    def list(self) -> list[dict[str, str]]:
        out = []
        for name in self.client.scan_iter(match=self.keys.api_key_pattern()):
            rec = {k.decode(): v.decode() for k, v in self.client.hgetall(name).items()}
            out.append({"key_id": name.decode().rsplit(":", 1)[1], **{k: rec.get(k, "") for k in ("scopes", "name", "created_at_ms", "revoked_at_ms")}})
        return sorted(out, key=lambda r: r["created_at_ms"])

    def _record(self, key_id: str) -> dict[bytes, bytes]:
        now = self.clock()
        hit = self._cache.get(key_id)
        if hit and now - hit[0] < self.cache_ttl_s:
            return hit[1]
        record = self.client.hgetall(self.keys.api_key(key_id))
        if record:  # unknown ids are not remembered: no memory to flood
            if self.cache_ttl_s > 0:
                self._cache[key_id] = (now, record)
            self._known[key_id] = record
        return record

    def verify(self, token: str, offline: bool = False) -> Principal | None:
        """The key's principal, or None for an unknown, malformed, wrong or revoked key.

        `offline`: judge by the last record Redis returned to this process (Redis is down); a
        key never seen before, or revoked when last seen, is refused.
        """
        parts = split_token(token)
        if parts is None:
            return None
        key_id, secret = parts
        record = self._known.get(key_id, {}) if offline else self._record(key_id)
        if not record or b"salt" not in record or b"revoked_at_ms" in record:
            return None
        expected = bytes.fromhex(record[b"hash"].decode())
        if not hmac.compare_digest(_digest(bytes.fromhex(record[b"salt"].decode()), secret), expected):
            return None
        return Principal(key_id=key_id, scopes=frozenset(record[b"scopes"].decode().split(",")))


class RequestGuard:
    """Authenticate, authorise and rate-limit one request; raises HTTPException with the status."""

    def __init__(
        self,
        store: ApiKeyStore,
        limiter: TokenBucketLimiter,
        limits: RateLimitSettings,
        auth: AuthSettings,
        unavailable_retry_after_s: int = 1,
    ):
        self.store = store
        self.limiter = limiter
        self.limits = limits
        self.auth = auth
        self.unavailable_retry_after_s = unavailable_retry_after_s

    def check(self, token: str | None, method: str, path: str) -> Principal | None:
        scope = required_scope(method, path)
        if scope is None or not self.auth.enabled:
            return None
        if not token:
            raise HTTPException(401, "missing API key: send `Authorization: Bearer <key>` or `X-API-Key`", {"WWW-Authenticate": "Bearer"})
        try:
            principal = self.store.verify(token)
            if principal is None:
                raise HTTPException(401, "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
            if not principal.allows(scope):
                raise HTTPException(403, f"this API key lacks the {scope!r} scope")
            limit = getattr(self.limits, scope)
            decision = self.limiter.acquire(self.store.keys.rate_bucket(principal.key_id, scope), limit.rate_per_s, limit.burst)
        except redis.RedisError:
            # Reads degrade rather than fail (serving answers from its local snapshot), for keys
            # this replica has verified before; rate limiting is skipped until Redis is back.
            # Writes cannot be stored anyway, so they get 503.
            principal = self.store.verify(token, offline=True) if scope == "read" else None
            if principal is not None and principal.allows(scope):
                log.warning("redis unavailable: admitting read request of a known key without rate limiting")
                return principal
            log.warning("redis unavailable while authorising a request")
            raise HTTPException(503, "storage unavailable, retry later", {"Retry-After": str(self.unavailable_retry_after_s)}) from None
        if not decision.allowed:
            raise HTTPException(429, f"rate limit of the {scope!r} scope exceeded", {"Retry-After": str(decision.retry_after_s)})
        return principal


def token_from(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


class api_key_dependency:  # noqa: N801 - used like a function: Depends(api_key_dependency(...))
    """An app-level FastAPI dependency: `FastAPI(dependencies=[Depends(api_key_dependency(...))])`.

    It runs for every API route, so a route added later is guarded without remembering to
    (the scope comes from `required_scope`). `guard_of` is called per request because a Serve
    replica builds its guard in `__init__`, after the app object is frozen. A class rather than
    a closure so that Serve's pickling of the app keeps its `Request` annotation resolvable.
    The blocking Redis calls run in the thread pool; a public route, or any route with auth
    off, is answered on the event loop without that hand-off.
    """

    def __init__(self, guard_of: Callable[[], RequestGuard]):
        self.guard_of = guard_of

    async def __call__(self, request: Request) -> Principal | None:
        route = request.scope.get("route")
        path = getattr(route, "path", request.url.path)
        guard = self.guard_of()
        if not guard.auth.enabled or required_scope(request.method, path) is None:
            return None
        return await run_in_threadpool(guard.check, token_from(request), request.method, path)


def build_guard(client: redis.Redis, key_prefix: str, auth: AuthSettings, limits: RateLimitSettings, unavailable_retry_after_s: int = 1) -> RequestGuard:
    """The guard a replica keeps: key store with its cache, and the Redis token buckets."""
    store = ApiKeyStore(client, Keys(key_prefix), cache_ttl_s=auth.cache_ttl_s)
    return RequestGuard(store, TokenBucketLimiter(client), limits, auth, unavailable_retry_after_s)
