"""Blender and Reranker: candidate retrieval + hybrid blend, then diversity re-ranking.

Both hold the model bundle in memory (item factors, embeddings, artists) and reload it when
a job publishes a new version.
"""

from __future__ import annotations

from ray import serve

from app.artifacts import ArtifactStore
from app.config import Settings
from app.models import ModelCache
from app.recommend import Blended, UserFeatures, blend_candidates, rerank_candidates
from app.schemas import RecommendationResponse


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Blender:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.models = ModelCache(ArtifactStore(settings.paths.artifacts_dir), settings.serving.reload_interval_s)

    def blend(self, features: UserFeatures) -> Blended:
        return blend_candidates(features, self.models.get(), self.settings.serving)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Reranker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.models = ModelCache(ArtifactStore(settings.paths.artifacts_dir), settings.serving.reload_interval_s)

    def rerank(self, blended: Blended, k: int, request_id: str) -> RecommendationResponse:
        items = rerank_candidates(blended, self.models.get(), k, self.settings.serving)
        return RecommendationResponse(
            user_id=blended.user_id,
            request_id=request_id,
            cold_start=blended.cold_start,
            items=items,
            model_versions=blended.versions,
        )
