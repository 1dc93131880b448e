"""ApiIngress: the HTTP front door (FastAPI, OpenAPI docs at /docs).

Concurrent recommendation requests are gathered into one batch that travels the DAG together:
one call per stage per batch (deployments/pipeline.py). Batches form when a slot frees
(app/batching.py), so at low load a batch is one request and adds no wait, and under load
batches grow and the per-call cost is shared.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fastapi import Body, Depends, FastAPI, Query
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.batching import CongestionLimit, NaturalBatcher
from app.config import Settings
from app.events.auth import api_key_dependency, build_guard
from app.events.body_limit import BodySizeLimit
from app.events.http import client_hints
from app.experiments.serving import ExperimentRouter
from app.query_params import query_names, unknown_parameter_errors
from app.redis_server import connect
from app.schemas import IngestResponse, RecommendationResponse
from app.trending.query import trending_query_errors
from app.flags import disabled_detail, with_flags
from deployments.gateway import ingest_events
from deployments.metrics import RequestMetrics, keep_fresh, record_open_batches, record_refused
from deployments.pipeline import RecommendationPipeline, RecommendationRequest
from deployments.runtime import REPLICA_ENV
from deployments.web import WebServices, mount_web

api = FastAPI(
    title="EchoTune",
    description="Hybrid music recommendations: listening events in, recommendations out.",
    version="0.1.0",
    # API key + scope + rate limit on every API route but /healthz (docs are not API routes).
    dependencies=[Depends(api_key_dependency(lambda: _replica().guard))],
)
api.add_middleware(BodySizeLimit, max_bytes_of=lambda: _replica().settings.gateway.max_body_bytes)
mount_web(api)  # the PWA under /app, its sign-in and push routes
api.add_middleware(RequestMetrics, deployment="ApiIngress")  # outermost: times every answer, 413s included


def _replica() -> "ApiIngress":
    """This replica's ApiIngress: Serve freezes `api` before __init__ runs, so per-replica
    state (the key store, settings) is reached through the replica context."""
    return serve.get_replica_context().servable_object


def _unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": errors})


# max_ongoing_requests high on purpose: see ApiIngress in ray_config.yaml. REPLICA_ENV: the
# app's runtime_env carries it under `serve deploy`; this carries it under `serve.run`.
@serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": REPLICA_ENV}}, max_ongoing_requests=1024)
@serve.ingress(api)
class ApiIngress:
    def __init__(
        self,
        settings: Settings,
        gateway: DeploymentHandle,
        fetcher: DeploymentHandle,
        blender: DeploymentHandle,
        reranker: DeploymentHandle,
        trending: DeploymentHandle | None = None,
        cf_retriever: DeploymentHandle | None = None,
        content_retriever: DeploymentHandle | None = None,
    ):
        self.settings = settings
        self.trending_lists = trending
        self.gateway = gateway
        self.fetcher = fetcher
        self.blender = blender
        self.reranker = reranker
        self.pipeline = RecommendationPipeline(fetcher, cf_retriever, content_retriever, blender, reranker)
        s = settings
        self.guard = build_guard(connect(s), s.redis.key_prefix, s.auth, s.rate_limit, s.gateway.unavailable_retry_after_s)
        self.web = WebServices(connect(s), s, self.guard)
        # Experiment definitions are re-read on a background thread, never inside a request.
        self.experiments = ExperimentRouter.from_settings(connect(s), s, refresh_interval_s=float("inf"))
        self.refresher = keep_fresh(self.experiments.cache.refresh, s.experiments.refresh_interval_s, "experiments")
        self._exposure_tasks: set[asyncio.Task] = set()  # strong refs until each append is done
        sv = s.serving
        slots: int | CongestionLimit = sv.request_batches_in_flight
        if sv.request_congestion_threshold is not None:
            slots = CongestionLimit(sv.request_batches_in_flight, sv.request_congestion_threshold)
        self.batcher = NaturalBatcher(self.pipeline.run, sv.request_batch_size, slots)
        # Sampled, not set per batch: the gauge is for an operator asking whether the limit is holding back.
        self.slots_reporter = keep_fresh(lambda: record_open_batches(self.batcher.open_slots()), 5.0, "batches-open")

    @api.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.post(
        "/v1/events",
        response_model=IngestResponse,
        tags=["events"],
        responses={422: {"description": "Malformed event; `detail[].loc` names the field."}},
    )
    async def post_events(self, body: Any = Body(..., description="One event, or {\"events\": [...]}."), hints: dict = Depends(client_hints)):
        if not self.settings.flags.feedback_events:
            record_refused("disabled")
            return JSONResponse(status_code=503, content=disabled_detail("feedback_events", "feedback events"))
        result = await ingest_events(self, body, hints["user_agent"], hints["accept_language"])
        if "errors" in result:
            return _unprocessable(result["errors"])
        if "unavailable" in result:
            retry = str(result["unavailable"])
            detail = result.get("detail", "event store unavailable, retry")
            return JSONResponse(status_code=503, content={"detail": detail}, headers={"Retry-After": retry})
        return result["response"]

    @api.get("/v1/users/{user_id}/recommendations", response_model=RecommendationResponse, tags=["recommendations"])
    async def recommendations(
        self, user_id: str, k: int = Query(20, description="How many tracks, 1..max_k."), names: list[str] = Depends(query_names)
    ):
        errors = unknown_parameter_errors(names, ("k",))
        if not 1 <= k <= self.settings.serving.max_k:
            errors.append({"loc": ["query", "k"], "msg": f"k must be between 1 and {self.settings.serving.max_k}", "type": "value_error"})
        if errors:
            return _unprocessable(errors)
        # Already rendered JSON: FastAPI does not validate a Response against `response_model`
        # again (`response_model` still documents it).
        return Response(await self._answer(user_id, k), media_type="application/json")

    async def recommend(self, user_id: str, k: int = 20) -> RecommendationResponse:
        """The recommendation answer; Python callers use it through a DeploymentHandle
        (`handle.recommend.remote(user_id, k)`), the HTTP route above serves its JSON."""
        return RecommendationResponse.model_validate_json(await self._answer(user_id, k))

    async def _answer(self, user_id: str, k: int) -> str:
        """The answer's JSON as the Reranker rendered it (deployments/ranking.py), labelled with
        the user's experiment and variant when they are in one."""
        if not 1 <= k <= self.settings.serving.max_k:
            raise ValueError(f"k must be between 1 and {self.settings.serving.max_k}, got {k}")
        # 128 random bits as hex, like uuid4().hex without the UUID object: 0.009 against
        # 0.031 ms with a live replica's cold caches.
        request_id = os.urandom(16).hex()
        started = time.perf_counter()
        assignments, params = self.experiments.assign(user_id)
        params = with_flags(params, self.settings.serving, self.settings.flags.hybrid_reco)
        rendered = await self.batcher.submit(RecommendationRequest(user_id, k, request_id, params))
        if not assignments:
            return rendered
        response = self.experiments.label(RecommendationResponse.model_validate_json(rendered), assignments)
        # Exposures are appended off the request path.
        latency_ms = round((time.perf_counter() - started) * 1000)
        task = asyncio.create_task(asyncio.to_thread(self.experiments.log_exposures, response, assignments, latency_ms))
        self._exposure_tasks.add(task)
        task.add_done_callback(self._exposure_tasks.discard)
        return response.model_dump_json()

    @api.get("/v1/trending", tags=["recommendations"], responses={422: {"description": "`detail[].loc` names the bad parameter."}})
    async def trending(
        self,
        genre: str | None = Query(None, description="Only this genre's trending tracks."),
        locale: str | None = Query(None, description="What trends among listeners of this locale (e.g. en-US)."),
        k: int = Query(20, description="How many tracks, 1..max_k."),
        names: list[str] = Depends(query_names),
    ):
        if not self.settings.flags.trending_detection:
            return JSONResponse(status_code=503, content=disabled_detail("trending_detection", "trending lists"))
        errors = unknown_parameter_errors(names, ("genre", "locale", "k"))
        errors += trending_query_errors(genre, locale, k, self.settings.serving.max_k)
        if errors:
            return _unprocessable(errors)
        return await self.trending_lists.top.remote(genre, locale, k)
