"""The recommendation DAG as the ingress drives it, one batch of requests at a time.

    fetch ─┬─▶ CF retrieval ──────┐
           ├─▶ content retrieval ─┼─▶ blend (+ trending, new releases, popular) ─▶ rerank
           └──────────────────────┘

The ingress gathers concurrent HTTP requests into a batch (app/batching.py) and every hop
below carries the whole batch: per-call overhead, not the arithmetic, limits a Serve chain,
so one call per stage for B requests is what lets the chain serve more than a chain of
per-request calls could (benchmarks/serve.py measures that against a bare chain). What a
stage hands on to the next stages crosses the ingress packed (deployments/packed.py).

The fast path schedules every stage at once, passing DeploymentResponses along without
awaiting in the middle (Serve resolves them; CF and content run in parallel as soon as the
features are in). Only if that fails does the slow path walk the stages one by one, replacing
each failed stage by its fallback: no features → the cold-start path; a retriever down →
blend without it; blend down → the reranker's popular list; rerank down → the blend's order.
The answers are then still 200s, marked `degraded`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from app.prefs import prefs_or_safe
from app.recommend import Blended, UserFeatures
from app.schemas import RecommendationResponse, RecommendedTrack
from deployments.metrics import after_answer, record_batch, record_fallback
from deployments.packed import Packed, pack, unpack

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class RecommendationRequest:
    user_id: str
    k: int
    request_id: str
    params: dict | None = None


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

    async def run(self, requests: list[RecommendationRequest]) -> list[str]:
        """Each request's answer as JSON, rendered by the Reranker (or here on the slow path)."""
        users = [r.user_id for r in requests]
        params = [r.params for r in requests]
        features = self.fetcher.fetch.remote(users)
        cf, content = self.cf.retrieve.remote(features, params), self.content.retrieve.remote(features, params)
        blended = self.blender.blend.remote(features, cf, content, params)
        try:
            answers = self.reranker.rerank.remote(blended, [r.k for r in requests], [r.request_id for r in requests], params)
            after_answer(record_batch, len(requests))  # once the calls above are on their way
            return await answers
        except Exception as exc:  # noqa: BLE001 - any stage failure takes the degraded path below
            log.warning("recommendation stage failed for %d requests, taking fallbacks: %s", len(requests), exc)
        self.fallbacks_taken += 1
        record_fallback()
        return await self._degraded(requests)

    async def _stage(self, name: str, call, default):
        try:
            return await call
        except Exception as exc:  # noqa: BLE001 - logged; the caller uses `default`
            log.warning("stage %s failed: %s", name, exc)
            return default

    async def _degraded(self, requests: list[RecommendationRequest]) -> list[str]:
        users = [r.user_id for r in requests]
        ks, ids, params = [r.k for r in requests], [r.request_id for r in requests], [r.params for r in requests]
        features = await self._stage("fetch", self.fetcher.fetch.remote(users), None)
        if features is None:
            # Preferences unknown: the safe side (app.prefs.prefs_or_safe).
            features = pack([UserFeatures(u, known=False, stale=True, prefs=prefs_or_safe(None)) for u in users])
        cf = await self._stage("cf", self.cf.retrieve.remote(features, params), None)
        content = await self._stage("content", self.content.retrieve.remote(features, params), None)
        packed: Packed[list[Blended]] | None = await self._stage("blend", self.blender.blend.remote(features, cf, content, params), None)
        if packed is None:
            # The blend is where trending and popular come in; without it, the reranker's own
            # popular list is the answer.
            responses = await self._stage("popular", self.reranker.popular.remote(features, ks, ids), None)
            return responses or [
                RecommendationResponse(user_id=u, request_id=i, cold_start=True, items=[], model_versions={}, degraded=True).model_dump_json()
                for u, i in zip(users, ids)
            ]
        blended = unpack(packed)
        for b in blended:
            b.degraded = True
        responses = await self._stage("rerank", self.reranker.rerank.remote(pack(blended), ks, ids, params), None)
        return responses or [_unranked(b, k, i).model_dump_json() for b, k, i in zip(blended, ks, ids)]


def _unranked(blended: Blended, k: int, request_id: str) -> RecommendationResponse:
    """The blend's own order, when the reranker is down."""
    return RecommendationResponse(
        user_id=blended.user_id, request_id=request_id, cold_start=blended.cold_start,
        items=[RecommendedTrack(track_id=t, score=float(s), sources=r)
               for t, s, r in zip(blended.track_ids[:k], blended.scores[:k], blended.reasons[:k])],
        model_versions=blended.versions, degraded=True, segment=blended.segment,
    )
