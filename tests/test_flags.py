"""Feature flags (`args.flags`): what each one switched off does.

    .venv/bin/pytest tests/test_flags.py -q

The pipeline's side of `trending_detection` is in tests/test_pipeline.py.
"""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import pytest

from app.config import ServingSettings, Settings, settings_from_args
from app.flags import non_personalised_overrides, with_flags
from app.recommend import Retrieved, UserFeatures, blend_candidates, rerank_candidates
from deployments.tuning import apply_overrides, for_request
from tests.test_recommend import NOW, bundle


def test_every_flag_is_on_by_default():
    assert Settings().flags.model_dump() == {
        "feedback_events": True, "hybrid_reco": True, "trending_detection": True, "experiment_evaluation": True,
    }


def test_hybrid_off_recommends_only_trending_and_popular():
    """A listener CF knows well: on, CF and content speak; off, only what is trending or popular."""
    b = bundle()
    features = UserFeatures(
        "u1", known=True, cf_vector=np.array([1.0, 0.0], dtype=np.float32), recent_tracks=["t0"], n_plays=20,
        trending=[("t5", 9.0), ("t6", 5.0)], popular=[("t4", 50.0), ("t7", 40.0)],
    )
    cf = Retrieved(["t1", "t2", "t3"], np.array([0.9, 0.8, 0.7]))
    content = Retrieved(["t2", "t3"], np.array([0.5, 0.4]))
    base = ServingSettings(recency_weight=0.0, mmr_lambda=1.0, artist_cap=10, genre_max_share=1.0)

    on = blend_candidates(features, b, base, cf=cf, content=content, now_ms=NOW)
    assert any("cf" in r for r in on.reasons)

    off_settings = apply_overrides(base, with_flags(None, base, hybrid_reco=False))
    off = blend_candidates(features, b, off_settings, cf=cf, content=content, now_ms=NOW)
    items = rerank_candidates(off, b, 10, off_settings)
    assert items and {t.track_id for t in items} <= {"t4", "t5", "t6", "t7"}
    assert all(set(t.sources) <= {"trending", "popular"} for t in items)


def test_hybrid_off_overrides_an_experiment_variant_and_keeps_hygiene():
    serving = ServingSettings()
    params = with_flags({"mmr_lambda": 0.5, "source_weights": {"cf": 2.0}}, serving, hybrid_reco=False)
    assert params["mmr_lambda"] == 0.5  # diversity and caps are not personalisation: kept
    assert set(params["source_weights"]) == {"trending", "popular"}
    served = for_request(serving, params)  # what the Blender blends with, every segment
    assert all(served.weights_for(s) == params["source_weights"] for s in ("new", "casual", "heavy"))
    assert with_flags({"mmr_lambda": 0.5}, serving, hybrid_reco=True) == {"mmr_lambda": 0.5}
    # Even a config that gives trending and popular no weight still answers something.
    zero = ServingSettings(source_weights={"cf": 1.0})
    assert non_personalised_overrides(zero)["source_weights"] == {"trending": 1.0, "popular": 1.0}


def test_experiment_evaluation_off_reads_and_rolls_back_nothing():
    from jobs.evaluate_experiment import evaluate_experiment

    settings = settings_from_args({"flags": {"experiment_evaluation": False}})
    report = evaluate_experiment(settings, "any", registry=None)  # the registry is never touched
    assert report["skipped"] == "flags.experiment_evaluation is off" and report["rolled_back"] == []


@pytest.fixture(scope="module")
def stand_in():
    """Stands in for every deployment behind the ingress (two replicas instead of eight): the
    flags are the ingress's business; the real stages are tested elsewhere."""
    from ray import serve

    from app.schemas import RecommendationResponse, RecommendedTrack

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class StandIn:
        def fetch(self, user_ids):
            return user_ids

        def retrieve(self, features, params):
            return None

        def blend(self, features, cf, content, params):
            return params

        def rerank(self, params, k, request_ids, _params):
            """Answers with the sources the ingress allowed, so the test sees the overrides."""
            return [
                RecommendationResponse(
                    user_id="u1", request_id=request_id, cold_start=False, model_versions={},
                    items=[RecommendedTrack(track_id="t000", score=1.0, sources=sorted((p or {}).get("source_weights", {"cf": 1})))],
                ).model_dump_json()  # the Reranker's answers are rendered JSON
                for p, request_id in zip(params, request_ids)
            ]

    return StandIn


@pytest.mark.ray
def test_ingress_with_flags_off(tmp_path, redis_server, redis_client, serve_port, stand_in):
    """Feedback, hybrid and trending off: events and trending answer 503 naming their flag
    (503, so client outboxes keep events for later) and store nothing; recommendations still
    come, from trending and popular only."""
    from ray import serve

    from app.events.auth import ApiKeyStore
    from app.keys import Keys
    from deployments.ingress import ApiIngress

    tag = uuid.uuid4().hex[:6]
    name, prefix = f"flags{tag}", f"/flags{tag}"
    settings = settings_from_args({
        "redis": {"url": redis_server.url, "key_prefix": f"fl{tag}", "stream_key": f"fl{tag}:events", "dead_letter_key": f"fl{tag}:dlq"},
        "paths": {"state_dir": str(tmp_path)},
        "flags": {"feedback_events": False, "hybrid_reco": False, "trending_detection": False},
    })
    key = ApiKeyStore(redis_client, Keys(settings.redis.key_prefix)).create({"ingest", "read"}).token
    d = stand_in.bind()
    serve.run(ApiIngress.bind(settings, d, d, d, d, d, cf_retriever=d, content_retriever=d), name=name, route_prefix=prefix)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}{prefix}", timeout=60, headers={"Authorization": f"Bearer {key}"}) as api:
            event = {"event_id": str(uuid.uuid4()), "user_id": "u1", "track_id": "t000", "event_type": "play", "timestamp": "2026-10-31T12:00:00Z"}
            resp = api.post("/v1/events", json=event)
            assert resp.status_code == 503 and resp.json()["flag"] == "feedback_events"
            assert "flags.feedback_events" in resp.json()["detail"]
            assert redis_client.xlen(settings.redis.stream_key) == 0  # nothing stored

            resp = api.get("/v1/trending")
            assert resp.status_code == 503 and resp.json()["flag"] == "trending_detection"

            resp = api.get("/v1/users/u1/recommendations", params={"k": 5})
            assert resp.status_code == 200, resp.text
            assert resp.json()["items"][0]["sources"] == ["popular", "trending"]
    finally:
        serve.delete(name)
