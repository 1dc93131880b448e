"""The recommendation DAG as the ingress drives it.

    fetch ─┬─▶ CF retrieval ──────┐
           ├─▶ content retrieval ─┼─▶ blend (+ trending, new releases, popular) ─▶ rerank
           └──────────────────────┘

The fast path schedules every stage at once, passing DeploymentResponses along without
awaiting in the middle (Serve resolves them; CF and content run in parallel as soon as the
features are in). Only if that fails does the slow path walk the stages one by one, replacing
each failed stage by its fallback: no features → the cold-start path; a retriever down →
blend without it; blend down → the reranker's popular list; rerank down → the blend's order. The
answer is then still a 200, marked `degraded`.
"""

from __future__ import annotations

import logging

from ray.serve.handle import DeploymentHandle

from app.recommend import Blended, UserFeatures
from app.schemas import RecommendationResponse, RecommendedTrack
from deployments.metrics import record_fallback

log = logging.getLogger("ray.serve")


class RecommendationPipeline:
    def __init__(
        self,
        fetcher: DeploymentHandle,
        cf: DeploymentHandle,
        content: DeploymentHandle,
        blender: DeploymentHandle,
        reranker: DeploymentHandle,
    ):
        self.fetcher, self.cf, self.content, self.blender, self.reranker = fetcher, cf, content, blender, reranker
        self.fallbacks_taken = 0

    async def run(self, user_id: str, k: int, request_id: str, params: dict | None) -> RecommendationResponse:
        features = self.fetcher.fetch.remote(user_id)
        blended = self.blender.blend.remote(features, self.cf.retrieve.remote(features), self.content.retrieve.remote(features), params)
        try:
            return await self.reranker.rerank.remote(blended, k, request_id, params)
        except Exception as exc:  # noqa: BLE001 - any stage failure takes the degraded path below
            log.warning("recommendation stage failed for %s, taking fallbacks: %s", user_id, exc)
        self.fallbacks_taken += 1
        record_fallback()
        return await self._degraded(user_id, k, request_id, params)

    async def _stage(self, name: str, call, default):
        try:
            return await call
        except Exception as exc:  # noqa: BLE001 - logged; the caller uses `default`
            log.warning("stage %s failed: %s", name, exc)
            return default

    async def _degraded(self, user_id: str, k: int, request_id: str, params: dict | None) -> RecommendationResponse:
        features = await self._stage("fetch", self.fetcher.fetch.remote(user_id), None)
        if features is None:
            features = UserFeatures(user_id, known=False, stale=True)
        cf = await self._stage("cf", self.cf.retrieve.remote(features), None)
        content = await self._stage("content", self.content.retrieve.remote(features), None)
        blended: Blended | None = await self._stage("blend", self.blender.blend.remote(features, cf, content, params), None)
        if blended is None:
            # The blend is where trending and popular come in; without it, the reranker's own
            # popular list is the answer.
            response = await self._stage("popular", self.reranker.popular.remote(user_id, k, request_id), None)
            return response or RecommendationResponse(
                user_id=user_id, request_id=request_id, cold_start=True, items=[], model_versions={}, degraded=True
            )
        blended.degraded = True
        response = await self._stage("rerank", self.reranker.rerank.remote(blended, k, request_id, params), None)
        if response is None:
            response = RecommendationResponse(
                user_id=user_id, request_id=request_id, cold_start=blended.cold_start,
                items=[RecommendedTrack(track_id=t, score=float(s), sources=r)
                       for t, s, r in zip(blended.track_ids[:k], blended.scores[:k], blended.reasons[:k])],
                model_versions=blended.versions, degraded=True, segment=blended.segment,
            )
        return response
