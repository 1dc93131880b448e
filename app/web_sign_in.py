"""Demo sign-in for the PWA: a listener id in, a short-lived ingest+read API key out.

Real deployments hand keys out with `echotune keys create`; this exists so the local demo's
web client can be opened and used at once. It is off unless `web.demo_sign_in` is true, and
the minted key record expires in Redis after `web.demo_key_ttl_s`.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

from app.events.auth import ApiKeyStore
from app.schemas import Id

DEMO_SCOPES = frozenset({"ingest", "read"})


class SignInRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id


class SignInResponse(BaseModel):
    user_id: str
    api_key: str
    """Send as `Authorization: Bearer <api_key>`."""
    scopes: list[str]
    expires_at_ms: int


def mint_demo_key(store: ApiKeyStore, user_id: str, ttl_s: int) -> SignInResponse:
    created = store.create(DEMO_SCOPES, name=f"web-demo:{user_id}")
    store.client.expire(store.keys.api_key(created.key_id), ttl_s)
    return SignInResponse(
        user_id=user_id,
        api_key=created.token,
        scopes=sorted(created.scopes),
        expires_at_ms=int((time.time() + ttl_s) * 1000),
    )
