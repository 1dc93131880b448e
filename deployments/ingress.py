"""ApiIngress: the HTTP front door (FastAPI, OpenAPI docs at /docs).

Recommendation requests are composed by chaining DeploymentResponses without awaiting in the
middle: fetch -> blend -> rerank are scheduled at once and only the final answer is awaited.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Body, FastAPI, Query
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import Settings
from app.schemas import IngestResponse, RecommendationResponse

api = FastAPI(
    title="EchoTune",
    description="Hybrid music recommendations: listening events in, recommendations out.",
    version="0.1.0",
)


def _unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": errors})


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(api)
class ApiIngress:
    def __init__(
        self,
        settings: Settings,
        gateway: DeploymentHandle,
        fetcher: DeploymentHandle,
        blender: DeploymentHandle,
        reranker: DeploymentHandle,
    ):
        self.settings = settings
        self.gateway = gateway
        self.fetcher = fetcher
        self.blender = blender
        self.reranker = reranker

    @api.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.post(
        "/v1/events",
        response_model=IngestResponse,
        tags=["events"],
        responses={422: {"description": "Malformed event; `detail[].loc` names the field."}},
    )
    async def post_events(self, body: Any = Body(..., description="One event, or {\"events\": [...]}.")):
        result = await self.gateway.ingest.remote(body)
        if "errors" in result:
            return _unprocessable(result["errors"])
        return result["response"]

    @api.get("/v1/users/{user_id}/recommendations", response_model=RecommendationResponse, tags=["recommendations"])
    async def recommendations(self, user_id: str, k: int = Query(20, description="How many tracks, 1..max_k.")):
        if not 1 <= k <= self.settings.serving.max_k:
            return _unprocessable(
                [{"loc": ["query", "k"], "msg": f"k must be between 1 and {self.settings.serving.max_k}", "type": "value_error"}]
            )
        request_id = uuid.uuid4().hex
        features = self.fetcher.fetch.remote(user_id)
        blended = self.blender.blend.remote(features)
        return await self.reranker.rerank.remote(blended, k, request_id)
