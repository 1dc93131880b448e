"""Blender and Reranker: hybrid blend of every candidate source, then diversity re-ranking.

Both hold the model bundle in memory (embeddings, artists, genres, release dates), reload it
when a job publishes a new version, batch requests with `@serve.batch` and take their knobs
from `user_config` (see deployments/tuning.py). A request may carry per-request overrides (an
experiment variant's parameters), validated the same way.
"""

from __future__ import annotations

from ray import serve

from app.recommend import Blended, Retrieved, UserFeatures, blend_candidates, rerank_candidates
from app.schemas import RecommendationResponse
from deployments.tuning import ModelServing, apply_overrides


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Blender(ModelServing):
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def blend(
        self,
        features: list[UserFeatures],
        cf: list[Retrieved | None],
        content: list[Retrieved | None],
        params: list[dict | None],
    ) -> list[Blended]:
        bundle = self.models.get()
        return [
            blend_candidates(f, bundle, apply_overrides(self.serving, p), cf=c, content=t)
            for f, c, t, p in zip(features, cf, content, params)
        ]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Reranker(ModelServing):
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def rerank(
        self, blended: list[Blended], k: list[int], request_id: list[str], params: list[dict | None]
    ) -> list[RecommendationResponse]:
        bundle = self.models.get()
        return [
            self._response(b, rerank_candidates(b, bundle, n, apply_overrides(self.serving, p)), rid)
            for b, n, rid, p in zip(blended, k, request_id, params)
        ]

    @staticmethod
    def _response(blended: Blended, items, request_id: str) -> RecommendationResponse:
        return RecommendationResponse(
            user_id=blended.user_id,
            request_id=request_id,
            cold_start=blended.cold_start,
            items=items,
            model_versions=blended.versions,
            degraded=blended.degraded,
            segment=blended.segment,
        )
