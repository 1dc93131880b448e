"""The recommendation DAG's fallback chain (deployments/pipeline.py): whichever stage fails, the
batch is still answered, marked `degraded`, from the previous stage's order.

The stages here are small in-process stand-ins for the deployments, called through adapters
shaped like DeploymentHandles (a pending response passed as an argument is resolved first, as
Serve does), so each stage can be made to fail on demand. The Serve app itself, with real
stages, is exercised over HTTP in tests/test_end_to_end.py.
"""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from app.ranking.blend import Reasons
from app.recommend import Blended, Retrieved, UserFeatures
from app.schemas import RecommendationResponse, RecommendedTrack
from deployments.packed import pack, unpack
from deployments.pipeline import RecommendationPipeline, RecommendationRequest

pytestmark = pytest.mark.ray  # the pipeline records Ray metrics


class Handle:
    """`handle.<method>.remote(*args)` over in-process stage methods."""

    def __init__(self, **methods):
        self._methods = methods

    def __getattr__(self, name):
        method = self._methods[name]

        async def call(args):
            return await method(*[await a if isinstance(a, asyncio.Future) else a for a in args])

        return SimpleNamespace(remote=lambda *args: asyncio.ensure_future(call(args)))


class Stages:
    """Fetch -> CF, content -> blend -> rerank on a catalog of ten tracks; `down` names the
    stages that fail."""

    def __init__(self, down=()):
        self.down = set(down)

    def _check(self, stage):
        if stage in self.down:
            raise RuntimeError(f"{stage} is down")

    async def fetch(self, users):
        self._check("fetch")
        return pack([UserFeatures(u, known=True) for u in users])

    async def cf(self, packed, params):
        self._check("cf")
        return pack([Retrieved(["t1", "t2"], np.array([2.0, 1.0])) for _ in unpack(packed)])

    async def content(self, packed, params):
        self._check("content")
        return pack([Retrieved(["t3"], np.array([1.0])) for _ in unpack(packed)])

    async def blend(self, packed_features, packed_cf, packed_content, params):
        self._check("blend")
        out = []
        for n, f in enumerate(unpack(packed_features)):
            ids, reasons = [], []
            for name, packed in (("cf", packed_cf), ("content", packed_content)):
                if packed is not None:  # None: that retriever failed
                    ids += unpack(packed)[n].track_ids
                    reasons += [name] * len(unpack(packed)[n].track_ids)
            ids.append("t9")
            reasons.append("popular")
            names = list(dict.fromkeys(reasons))
            masks = np.array([1 << names.index(r) for r in reasons])
            out.append(Blended(f.user_id, False, ids, np.linspace(1, 0.5, len(ids)), Reasons(names, masks), {"cf": "v1"}))
        return pack(out)

    async def rerank(self, packed, ks, ids, params):
        self._check("rerank")
        return [
            RecommendationResponse(
                user_id=b.user_id, request_id=i, cold_start=False, degraded=b.degraded, model_versions=b.versions,
                items=[RecommendedTrack(track_id=t, score=1.0, sources=["reranked"]) for t in reversed(b.track_ids[:k])],
            ).model_dump_json()
            for b, k, i in zip(unpack(packed), ks, ids)
        ]

    async def popular(self, packed_features, ks, ids):
        """The listener's features come along: the popular list is filtered by them
        (app.recommend.popular_fallback); here a known listener says so."""
        self._check("popular")
        return [
            RecommendationResponse(user_id=f.user_id, request_id=i, cold_start=not f.known, degraded=True, model_versions={},
                                   items=[RecommendedTrack(track_id="t0", score=1.0, sources=["popular"])]).model_dump_json()
            for f, i in zip(unpack(packed_features), ids)
        ]


def answer(*down, users=("u1", "u2")):
    stages = Stages(down)
    pipeline = RecommendationPipeline(
        Handle(fetch=stages.fetch), Handle(retrieve=stages.cf), Handle(retrieve=stages.content),
        Handle(blend=stages.blend), Handle(rerank=stages.rerank, popular=stages.popular),
    )
    requests = [RecommendationRequest(u, 3, f"r-{u}") for u in users]
    rendered = asyncio.run(pipeline.run(requests))
    return [RecommendationResponse.model_validate_json(r) for r in rendered], pipeline


def test_all_stages_up_gives_the_reranked_answer_not_degraded(ray_cluster):
    responses, pipeline = answer()
    assert [r.user_id for r in responses] == ["u1", "u2"] and [r.request_id for r in responses] == ["r-u1", "r-u2"]
    assert [i.track_id for i in responses[0].items] == ["t3", "t2", "t1"] and not responses[0].degraded
    assert pipeline.fallbacks_taken == 0


def test_a_retriever_down_blends_without_it(ray_cluster):
    responses, pipeline = answer("cf")
    assert [i.track_id for i in responses[0].items] == ["t9", "t3"] and responses[0].degraded
    assert pipeline.fallbacks_taken == 1


def test_the_reranker_down_answers_the_blends_order_with_its_reasons(ray_cluster):
    responses, _ = answer("rerank")
    assert [(i.track_id, i.sources) for i in responses[1].items] == [("t1", ["cf"]), ("t2", ["cf"]), ("t3", ["content"])]
    assert all(r.degraded for r in responses)


def test_the_blend_down_answers_the_popular_list(ray_cluster):
    responses, _ = answer("blend")
    assert [r.user_id for r in responses] == ["u1", "u2"]
    assert [i.track_id for i in responses[0].items] == ["t0"] and not responses[0].cold_start and responses[0].degraded


def test_the_blend_and_the_feature_store_down_answer_the_popular_list_as_cold_start(ray_cluster):
    responses, _ = answer("fetch", "blend")
    assert [(r.user_id, r.cold_start, r.degraded) for r in responses] == [("u1", True, True), ("u2", True, True)]


def test_the_feature_store_down_still_answers_every_user(ray_cluster):
    responses, _ = answer("fetch")
    assert [r.user_id for r in responses] == ["u1", "u2"] and all(r.degraded and r.items for r in responses)


def test_everything_down_still_answers_each_request_empty_and_degraded(ray_cluster):
    responses, _ = answer("fetch", "cf", "content", "blend", "rerank", "popular")
    assert [(r.user_id, r.items, r.degraded) for r in responses] == [("u1", [], True), ("u2", [], True)]
