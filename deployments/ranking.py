"""Blender and Reranker: hybrid blend of every candidate source, then diversity re-ranking.

Both run on the replica's event loop (`async` methods): a plain method is handed to a worker
thread and back on every call, which cost more than the work. The Blender reads the shared
lists on its background refresh thread (app/refresh.py); only while they are stale (Redis
was unreachable) does a request read them again, and then the reader's breaker
(features.outage_retry_s) bounds how often a hung Redis can block the loop. Two copies of the app on one 2-core cluster, the same load alternating between them
(benchmarks/serve.py's load, three rounds): with the Blender's and the FeatureFetcher's methods
`async` the Blender spent 2.90-2.95 against 3.43-3.70 ms of CPU per request at 50 req/s, the
FeatureFetcher 1.85 against 2.25-2.58, the p95 was 27-32 against 31-43 ms, and saturation
196-203 against 172-181 req/s.

Both hold the model bundle in memory (embeddings, artists, genres, release dates), reload it
when a job publishes a new version, take the ingress's batch of requests in one call and their knobs
from `user_config` (see deployments/tuning.py). A request may carry per-request overrides (an
experiment variant's parameters), validated the same way.
"""

from __future__ import annotations

from ray import serve

from app.config import Settings
from app.features.lists import SharedLists
from app.features.reader import FeatureReader
from app.features.store import RedisOnlineStore
from app.keys import Keys
from app.ranking.blend import compile_blend
from app.ranking.rerank import compile_mmr
from app.recommend import (
    Blended, Retrieved, UserFeatures, blend_candidates, placed_in, popular_fallback, rerank_candidates, shared_candidates,
)
from app.redis_server import connect
from app.schemas import RecommendationResponse
from deployments.packed import Packed, pack, unpack
from deployments.tuning import ModelServing, for_request


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Blender(ModelServing):
    def __init__(self, settings: Settings):
        compile_blend()
        # The alias and the lists are re-read by refresh() on the background thread.
        self.reader = FeatureReader(
            RedisOnlineStore(connect(settings), Keys(settings.redis.key_prefix)),
            refresh_s=float("inf"),
            max_entries=0,
            retry_s=settings.features.outage_retry_s,
        )
        self.lists = SharedLists(self.reader, ("trending", "popular"), settings.serving.candidates, float("inf"))
        self._shared: tuple = (None, None, None)  # (lists, bundle, their shared_candidates)
        super().__init__(settings)

    def refresh(self) -> None:
        # The lists first: they handle an outage themselves, and a model that fails to load
        # (raising to the refresher, which logs it) must not keep them from moving on.
        self.reader.refresh()
        self.lists.refresh()
        super().refresh()
        self._shared_candidates(self.lists.get(), self.models.get())  # resolved here, off the request path

    async def blend(
        self,
        packed_features: Packed[list[UserFeatures]],
        packed_cf: Packed[list[Retrieved]] | None,
        packed_content: Packed[list[Retrieved]] | None,
        params: list[dict | None],
    ) -> Packed[list[Blended]]:
        """`cf` or `content` is None when that retriever failed: blend without it."""
        bundle, previous = self.models.get(), self.models.previous
        features = unpack(packed_features)
        cf = [placed_in(r, bundle, previous) for r in unpack(packed_cf) or [None] * len(features)]
        content = [placed_in(r, bundle, previous) for r in unpack(packed_content) or [None] * len(features)]
        lists = self.lists.get()
        for f in features:
            f.trending, f.popular = lists["trending"], lists["popular"]
            f.stale = f.stale or self.lists.stale
        shared = self._shared_candidates(lists, bundle)
        return pack([
            blend_candidates(f, bundle, for_request(self.serving, p), cf=c, content=t, shared=shared)
            for f, c, t, p in zip(features, cf, content, params)
        ])

    def _shared_candidates(self, lists: dict, bundle) -> dict[str, Retrieved] | None:
        """Resolved again only when the lists were re-read or the bundle reloaded (both are
        replaced, not changed in place)."""
        if bundle is None:
            return None
        if self._shared[0] is not lists or self._shared[1] is not bundle:
            self._shared = (lists, bundle, shared_candidates(bundle, lists["trending"], lists["popular"]))
        return self._shared[2]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Reranker(ModelServing):
    def __init__(self, settings: Settings):
        super().__init__(settings)
        compile_mmr()

    async def rerank(
        self, packed_blended: Packed[list[Blended]], k: list[int], request_id: list[str], params: list[dict | None]
    ) -> list[str]:
        bundle = self.models.get()
        blended = unpack(packed_blended)
        return [
            self._response(b, rerank_candidates(b, bundle, n, for_request(self.serving, p)), rid)
            for b, n, rid, p in zip(blended, k, request_id, params)
        ]

    async def popular(self, packed_features: Packed[list[UserFeatures]], k: list[int], request_id: list[str]) -> list[str]:
        """Last resort when the blend itself failed: the replica's own popular list, filtered
        by each listener's preferences and recent plays."""
        bundle = self.models.get()
        responses = []
        for features, n, rid in zip(unpack(packed_features), k, request_id):
            blended = popular_fallback(features, bundle, self.serving)
            responses.append(self._response(blended, rerank_candidates(blended, bundle, n, self.serving), rid))
        return responses

    @staticmethod
    def _response(blended: Blended, items, request_id: str) -> str:
        """The answer's JSON, rendered once here and passed through the ingress as it is: the
        model itself, pickled to the ingress and back, cost 48 µs per answer (20 items, warm),
        its JSON 7."""
        return RecommendationResponse(
            user_id=blended.user_id,
            request_id=request_id,
            cold_start=blended.cold_start,
            items=items,
            model_versions=blended.versions,
            degraded=blended.degraded,
            segment=blended.segment,
        ).model_dump_json()
