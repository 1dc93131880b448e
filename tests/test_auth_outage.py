"""API keys during a Redis outage: known readers keep reading, writers and strangers are refused."""

import pytest
import redis
from fastapi import HTTPException

from app.config import Settings
from app.events.auth import ApiKeyStore, build_guard
from app.keys import Keys
from app.redis_server import EmbeddedRedis

READ = ("GET", "/v1/users/u1/recommendations")
WRITE = ("POST", "/v1/events")


def test_outage_admits_known_readers_only(tmp_path):
    settings = Settings(auth={"cache_ttl_s": 0})  # every check reads Redis
    server = EmbeddedRedis(tmp_path, appendonly=False).start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        store = ApiKeyStore(client, Keys("t"))
        known = store.create({"read", "ingest"}).token
        stranger = store.create({"read"}).token
        revoked = store.create({"read"})
        guard = build_guard(client, "t", settings.auth, settings.rate_limit, 1)
        assert guard.check(known, *READ).key_id
        assert guard.check(revoked.token, *READ)
        store.revoke(revoked.key_id)
        with pytest.raises(HTTPException) as info:
            guard.check(revoked.token, *READ)
        assert info.value.status_code == 401
    finally:
        server.stop()

    assert guard.check(known, *READ).key_id  # verified before the outage: still reads
    for token, route in ((stranger, READ), (revoked.token, READ), (known, WRITE)):
        with pytest.raises(HTTPException) as info:
            guard.check(token, *route)
        assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "1"
