"""The PWA (static files of web/ under /app) and the routes it needs beyond the core API:
demo sign-in, the VAPID public key and push subscriptions.

`mount_web(api)` adds them to the ingress app. Every route here goes through the ingress's
app-level API-key dependency (sign-in is a public path, rate limited by client address);
the static files are a mounted sub-app, public like /docs.
"""

from __future__ import annotations

from pathlib import Path

import redis
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from starlette.types import Scope

from app.config import Settings
from app.events.auth import ApiKeyStore, RequestGuard
from app.keys import Keys
from app.push.subscriptions import SubscriptionRequest, SubscriptionStore, UnsubscribeRequest, endpoint_problem
from app.push.vapid import load_vapid_keys, vapid_key_path
from app.web_sign_in import SignInRequest, SignInResponse, mint_demo_key

WEB_DIR = Path(__file__).resolve().parents[1] / "web"

router = APIRouter()


class WebServices:
    """Per-replica state of the web routes (the ingress builds one in its __init__)."""

    def __init__(self, client: redis.Redis, settings: Settings, guard: RequestGuard):
        keys = Keys(settings.redis.key_prefix)
        self.settings = settings
        self.guard = guard
        self.api_keys = ApiKeyStore(client, keys)
        self.subscriptions = SubscriptionStore(client, keys, settings.push.max_subscriptions_per_user)
        self.vapid_path = vapid_key_path(settings)


def _web() -> WebServices:
    return serve.get_replica_context().servable_object.web


@router.post("/v1/web/sign-in", response_model=SignInResponse, tags=["web"], responses={404: {"description": "Demo sign-in is off."}})
def sign_in(body: SignInRequest, request: Request):
    """A short-lived ingest+read key for a listener id (local demos; `web.demo_sign_in`)."""
    web = _web()
    if not web.settings.web.demo_sign_in:
        raise HTTPException(404, "demo sign-in is off (web.demo_sign_in); ask an operator for an API key")
    limit = web.settings.rate_limit.admin
    client_host = request.client.host if request.client else "unknown"
    bucket = web.api_keys.keys.rate_bucket(f"sign-in:{client_host}", "admin")
    decision = web.guard.limiter.acquire(bucket, limit.rate_per_s, limit.burst)
    if not decision.allowed:
        raise HTTPException(429, "too many sign-ins", {"Retry-After": str(decision.retry_after_s)})
    return mint_demo_key(web.api_keys, body.user_id, web.settings.web.demo_key_ttl_s)


@router.get("/v1/push/vapid-public-key", tags=["push"], responses={404: {"description": "No VAPID key yet."}})
def vapid_public_key() -> dict:
    """The `applicationServerKey` browsers subscribe with."""
    keys = load_vapid_keys(_web().vapid_path)
    if keys is None:
        raise HTTPException(404, "push is not set up: run `echotune push keys`")
    return {"public_key": keys.public_key}


@router.post("/v1/push/subscriptions", status_code=201, tags=["push"], responses={422: {"description": "`detail[].loc` names the field."}})
def subscribe(body: SubscriptionRequest):
    """Store a device's push subscription (with the listener's time zone and genres)."""
    web = _web()
    problem = endpoint_problem(body.subscription.endpoint, web.settings.push.endpoint_hosts)
    if problem:
        return JSONResponse(status_code=422, content={"detail": [{"loc": ["body", "subscription", "endpoint"], "msg": problem, "type": "value_error"}]})
    sub_id, devices = web.subscriptions.add(body)
    return {"user_id": body.user_id, "subscription_id": sub_id, "devices": devices}


@router.delete("/v1/push/subscriptions", status_code=204, tags=["push"], responses={404: {"description": "No such device for this listener."}})
def unsubscribe(body: UnsubscribeRequest):
    """Forget a device's push subscription (the PWA calls it on sign-out)."""
    if not _web().subscriptions.remove_endpoint(body.user_id, body.endpoint):
        raise HTTPException(404, "no push subscription with this endpoint for this listener")
    return Response(status_code=204)


class ShellFiles(StaticFiles):
    """The PWA's files with `Cache-Control: no-cache`: without it the browser's heuristic
    cache may answer the service worker's refresh with the previous deploy's app.js for hours.
    Revalidation (ETag, 304) keeps the check cheap."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_web(api: FastAPI) -> None:
    api.include_router(router)
    api.mount("/app", ShellFiles(directory=WEB_DIR, html=True, check_dir=False), name="web")
