"""The whole path on a tiny world, every part real: HTTP gateway -> Redis Stream -> Parquet ->
three Ray Data jobs in parallel -> artifacts -> Redis feature store -> Serve DAG over HTTP."""

from __future__ import annotations

import uuid
from collections import Counter

import httpx
import pandas as pd
import pytest

from app.config import settings_from_args

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

TINY_WORLD = {
    "seed": 3,
    "n_users": 80,
    "n_artists": 40,
    "n_tracks": 240,
    "genres": ["rock", "jazz", "electronic", "classical"],
    "days": 7,
    "sessions_per_user": 5.0,
    "tracks_per_session": 8.0,
    "n_breakouts": 2,
    "clip_seconds": 2.0,
}


@pytest.fixture(scope="module")
def system(tmp_path_factory, redis_server, serve_port):
    """Runs the pipeline once; the tests below query the result."""
    from ray import serve

    from app.data.world import generate_world, load_world
    from deployments.app import build_app
    from jobs.batch import run_parallel
    from jobs.export_events import export_events
    from jobs.materialize import materialize
    from jobs.parity_check import parity_check

    state = tmp_path_factory.mktemp("state")
    args = {
        "redis": {"url": redis_server.url, "key_prefix": f"e2e{uuid.uuid4().hex[:6]}"},
        "paths": {"state_dir": str(state)},
        "world": TINY_WORLD,
        "cf": {"factors": 16, "iterations": 8},
        "content": {"concurrency": 1, "batch_size": 32, "embedding_dim": 8},
        "trending": {"min_plays": 3},
        "serving": {"reload_interval_s": 0.5},
    }
    settings = settings_from_args(args)
    generate_world(settings.world, settings.paths.world_dir)
    world = load_world(settings.paths.world_dir)

    serve.run(build_app(args), name="echotune", route_prefix="/")
    import redis

    from app.events.auth import ApiKeyStore
    from app.keys import Keys

    key = ApiKeyStore(redis.Redis.from_url(redis_server.url), Keys(settings.redis.key_prefix)).create({"ingest", "read"}).token
    api = httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=60, headers={"Authorization": f"Bearer {key}"})

    events = world.events.copy()
    events["timestamp"] = events["timestamp"].map(lambda t: t.isoformat())
    records = events[["event_id", "user_id", "track_id", "event_type", "timestamp", "duration_ms"]].to_dict("records")
    accepted = 0
    for i in range(0, len(records), 1000):
        resp = api.post("/v1/events", json={"events": records[i : i + 1000]})
        assert resp.status_code == 200, resp.text
        accepted += resp.json()["accepted"]

    export = export_events(settings)
    batch = run_parallel(settings)
    mat = materialize(settings)
    parity = parity_check(settings)
    yield {
        "api": api, "settings": settings, "world": world, "accepted": accepted,
        "export": export, "batch": batch, "materialize": mat, "parity": parity,
    }
    api.close()
    serve.delete("echotune")


def test_every_posted_event_reaches_parquet_once(system):
    world = system["world"]
    assert system["accepted"] == len(world.events)
    exported = pd.read_parquet(system["settings"].paths.events_dir)
    assert len(exported) == len(world.events)
    assert exported["event_id"].is_unique
    assert set(exported["event_id"]) == set(world.events["event_id"])


def test_batch_jobs_publish_versioned_artifacts(system):
    from app.artifacts import ArtifactStore

    store = ArtifactStore(system["settings"].paths.artifacts_dir)
    for name in ("content", "cf", "trending"):
        art = store.latest(name)
        assert art is not None, name
        assert store.verify(art) == [], f"{name} artifact does not match its manifest"
    assert system["batch"]["content"]["audio_failed"] == 0
    assert system["materialize"]["users"] == system["world"].events["user_id"].nunique()


def test_materialised_features_match_the_offline_snapshot_exactly(system):
    parity = system["parity"]
    assert parity["values"] > 0 and {v["view"] for v in parity["views"]} == {"user_profile", "track_profile"}
    assert parity["mismatches"] == 0, parity["views"]


def test_focused_listener_gets_their_genre(system):
    """A user who listens mostly to one genre gets mostly that genre back."""
    world, api = system["world"], system["api"]
    plays = world.events[world.events["event_type"] == "play"].merge(world.tracks[["track_id", "genre"]], on="track_id")
    share = plays.groupby("user_id")["genre"].agg(lambda g: g.value_counts(normalize=True).iloc[0])
    top = plays.groupby("user_id")["genre"].agg(lambda g: g.value_counts().index[0])
    focused = share[(share >= 0.8) & (plays.groupby("user_id").size() >= 15)].index[:5]
    assert len(focused) >= 3, "the tiny world should contain focused listeners"
    for user in focused:
        body = api.get(f"/v1/users/{user}/recommendations", params={"k": 10}).json()
        assert body["cold_start"] is False
        genres = Counter(item["genre"] for item in body["items"])
        assert len(body["items"]) == 10
        assert genres[top[user]] >= 6, f"{user} listens to {top[user]} but got {genres}"
        assert {"cf", "content"} & {s for item in body["items"] for s in item["sources"]}
        assert set(body["model_versions"]) >= {"cf", "content", "trending", "features"}


def test_recommendations_exclude_heard_tracks_and_respect_artist_cap(system):
    world, api = system["world"], system["api"]
    user = world.users["user_id"].iloc[0]
    body = api.get(f"/v1/users/{user}/recommendations", params={"k": 20}).json()
    heard = set(world.events.loc[world.events["user_id"] == user, "track_id"])
    ids = [i["track_id"] for i in body["items"]]
    assert not heard & set(ids)
    assert len(ids) == len(set(ids))
    assert max(Counter(i["artist_id"] for i in body["items"]).values()) <= system["settings"].serving.artist_cap


def test_unknown_user_gets_popular_tracks_marked_cold_start(system):
    body = system["api"].get("/v1/users/nobody-here/recommendations", params={"k": 5})
    assert body.status_code == 200
    data = body.json()
    assert data["cold_start"] is True and len(data["items"]) == 5
    # only the sources that need no history may speak for a stranger
    cold_sources = {"popular", "trending", "new_releases", "recency_boost", "diversity_demoted"}
    assert all(set(i["sources"]) <= cold_sources for i in data["items"])
    assert all({"popular", "trending", "new_releases"} & set(i["sources"]) for i in data["items"])
    assert data["segment"] == "new"


@pytest.mark.parametrize("k", [0, 201, -3])
def test_k_out_of_range_is_422_naming_k(system, k):
    resp = system["api"].get("/v1/users/u0001/recommendations", params={"k": k})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["query", "k"]


def test_malformed_event_is_422_naming_field_and_nothing_is_stored(system, redis_server):
    import redis

    settings = system["settings"]
    client = redis.Redis.from_url(redis_server.url)
    before = client.xlen(settings.redis.stream_key)
    good = {"event_id": str(uuid.uuid4()), "user_id": "u1", "track_id": "t1", "event_type": "play", "timestamp": "2026-10-30T10:00:00Z"}
    bad = {**good, "event_id": str(uuid.uuid4()), "event_type": "listen"}
    resp = system["api"].post("/v1/events", json={"events": [good, bad]})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", "events", 1, "event_type"]
    assert client.xlen(settings.redis.stream_key) == before
