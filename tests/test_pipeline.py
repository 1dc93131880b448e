"""`jobs.pipeline` on a tiny world with the real jobs: a full run, a second run that finds
everything up to date, and a run whose CF job breaks, which must leave what was published
serving.

    .venv/bin/pytest tests/test_pipeline.py -q
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from app.artifacts import ArtifactStore
from app.config import settings_from_args

pytestmark = pytest.mark.ray

WORLD = {
    "seed": 11, "n_users": 30, "n_artists": 8, "n_tracks": 40, "genres": ["rock", "jazz", "classical"],
    "days": 7, "sessions_per_user": 3.0, "tracks_per_session": 5.0, "n_breakouts": 1, "clip_seconds": 1.0,
}


def _post(settings, client, events) -> int:
    """Through the gateway's own ingestor: the same validation and Redis Stream as HTTP."""
    from app.events.enrichment import RequestContext
    from app.events.ingest import EventIngestor
    from app.events.stream import EventStream

    now = datetime.now(timezone.utc)
    ingestor = EventIngestor(EventStream.from_settings(client, settings), settings.gateway)
    ctx = RequestContext.from_headers(None, None, int(now.timestamp() * 1000))
    records = events[["event_id", "user_id", "track_id", "event_type", "timestamp"]].copy()
    records["timestamp"] = records["timestamp"].map(lambda t: t.isoformat())
    return ingestor.ingest({"events": records.to_dict("records")}, ctx, now).accepted


@pytest.fixture(scope="module")
def first_run(ray_cluster, redis_server, tmp_path_factory):
    import redis

    from app.data.world import generate_world, load_world
    from jobs.pipeline import run_pipeline

    state = tmp_path_factory.mktemp("pipeline-state")
    settings = settings_from_args({
        "redis": {"url": redis_server.url, "key_prefix": f"pl{uuid.uuid4().hex[:6]}",
                  "stream_key": f"pl:{uuid.uuid4().hex[:6]}:events", "dead_letter_key": f"pl:{uuid.uuid4().hex[:6]}:dlq"},
        "paths": {"state_dir": str(state)},
        "world": WORLD,
        "cf": {"factors": 8, "iterations": 4, "ray_workers": 0, "eval_fraction": 0.0},
        "content": {"concurrency": 1, "batch_size": 40, "embedding_dim": 4, "analysis_seconds": 1.0},
        "trending": {"min_plays": 2},
    })
    generate_world(settings.world, settings.paths.world_dir)
    world = load_world(settings.paths.world_dir)
    client = redis.Redis.from_url(redis_server.url)
    held_back = world.events.tail(20)
    assert _post(settings, client, world.events.iloc[:-20]) == len(world.events) - 20
    report = run_pipeline(settings)
    return {"settings": settings, "client": client, "report": report, "held_back": held_back}


def _stages(report) -> dict:
    return {s["stage"]: s for s in report["stages"]}


def test_first_run_runs_every_stage_and_records_it(first_run):
    from app.pipeline_state import latest_run

    report, settings = first_run["report"], first_run["settings"]
    stages = _stages(report)
    assert report["outcome"] == "ok", report
    assert list(stages) == ["export", "content", "cf", "trending", "materialize", "parity"]
    for name, stage in stages.items():
        assert stage["outcome"] == "ok", (name, stage)
        assert stage["started_at"]
    assert stages["parity"]["summary"]["mismatches"] == 0 and stages["parity"]["summary"]["values"] > 0
    on_disk = latest_run(settings.paths.state_dir / "pipeline")
    assert on_disk["run_id"] == report["run_id"] and on_disk["outcome"] == "ok"


def test_second_run_skips_what_is_up_to_date(first_run):
    from jobs.pipeline import run_pipeline

    report = run_pipeline(first_run["settings"])
    stages = _stages(report)
    assert report["outcome"] == "ok"
    for name in ("export", "content", "cf", "trending", "materialize"):
        assert stages[name]["outcome"] == "skipped", (name, stages[name])
    assert "export cursor" in stages["export"]["reason"]
    assert "unchanged" in stages["cf"]["reason"]
    assert stages["parity"]["outcome"] == "ok"  # always checked


def test_failed_stage_leaves_previous_versions_serving(first_run):
    """New events arrive, CF breaks: the run fails at CF, the CF version and the feature
    namespace that were published stay, and materialisation does not run on a half-updated set."""
    from app.features.store import RedisOnlineStore
    from app.keys import Keys
    from jobs.pipeline import run_pipeline

    settings, client = first_run["settings"], first_run["client"]
    store = ArtifactStore(settings.paths.artifacts_dir)
    online = RedisOnlineStore(client, Keys(settings.redis.key_prefix))
    cf_before, namespace_before = store.latest_version("cf"), online.current().namespace
    assert _post(settings, client, first_run["held_back"]) == 20

    def broken_cf(settings):  # defined here, so Ray ships it by value to the task
        raise RuntimeError("ALS diverged (injected)")

    def quick(settings):  # content and trending are not under test here: skip their cost
        return {"job": "stub"}

    report = run_pipeline(settings, jobs={"cf": broken_cf, "content": quick, "trending": quick})
    stages = _stages(report)
    assert report["outcome"] == "failed"
    assert stages["export"]["outcome"] == "ok" and stages["export"]["summary"]["exported"] == 20
    assert stages["cf"]["outcome"] == "failed" and "ALS diverged" in stages["cf"]["reason"]
    assert stages["materialize"]["outcome"] == "not_run" and "cf" in stages["materialize"]["reason"]
    assert store.latest_version("cf") == cf_before
    assert store.verify(store.latest("cf")) == []
    assert online.current().namespace == namespace_before
    manifest = json.loads((settings.paths.state_dir / "pipeline" / "runs" / f"{report['run_id']}.json").read_text())
    assert manifest["outcome"] == "failed"


def test_a_new_audio_feature_definition_reruns_only_the_content_job(first_run, monkeypatch):
    """An upgrade that redefines the audio features must rebuild the content artifact even
    though no input changed: cold start refuses an artifact of another feature version."""
    import training.content
    from jobs.pipeline import batch_fingerprints

    before = batch_fingerprints(first_run["settings"], "events")
    monkeypatch.setattr(training.content, "AUDIO_FEATURE_VERSION", training.content.AUDIO_FEATURE_VERSION + 1)
    after = batch_fingerprints(first_run["settings"], "events")
    assert after["content"] != before["content"]
    assert (after["cf"], after["trending"]) == (before["cf"], before["trending"])


def test_a_changed_catalogue_reruns_content_and_trending_not_cf(tmp_path):
    """Both jobs read the configured catalogue (jobs.trending.catalogue_path)."""
    from app.config import settings_from_args
    from jobs.pipeline import batch_fingerprints

    catalogue = tmp_path / "catalogue.parquet"
    catalogue.write_bytes(b"first")
    settings = settings_from_args({"paths": {"state_dir": str(tmp_path)}, "content": {"catalog_path": str(catalogue)}})
    before = batch_fingerprints(settings, "events")
    catalogue.write_bytes(b"second")
    after = batch_fingerprints(settings, "events")
    assert after["content"] != before["content"] and after["trending"] != before["trending"]
    assert after["cf"] == before["cf"]


def test_a_materialisation_that_fails_leaves_no_namespace_behind(first_run, monkeypatch):
    """Its views were written before the failure; unpublished, nobody would read them, and they
    would hold Redis memory for their whole TTL."""
    import jobs.materialize as job
    from app.features.store import RedisOnlineStore
    from app.keys import Keys

    settings, client = first_run["settings"], first_run["client"]
    before = set(client.scan_iter(match=f"{settings.redis.key_prefix}:*", count=1000))

    def writes_some_then_fails(settings, namespace, view, rows):
        """The first rows land (as the Ray Data writers would write them), then a writer dies."""
        some = [(str(entity), row.dropna().to_dict()) for entity, row in rows.head(5).iterrows()]
        assert RedisOnlineStore(client, Keys(settings.redis.key_prefix)).write(namespace, view, some) > 0
        raise OSError("writer lost")

    monkeypatch.setattr(job, "write_online", writes_some_then_fails)
    with pytest.raises(OSError, match="writer lost"):
        job.materialize(settings)
    assert set(client.scan_iter(match=f"{settings.redis.key_prefix}:*", count=1000)) == before


def test_an_unchanged_namespace_is_written_again_before_its_keys_expire(first_run):
    """A quiet month (no new events, no new model) must not let every listener's features
    expire under the alias: once its first key has used half the shortest view TTL, the
    pipeline materialises anyway."""
    from app.keys import Keys
    from app.pipeline_state import files_fingerprint
    from jobs.common import event_files
    from jobs.pipeline import Pipeline, materialize_fingerprint

    settings, client = first_run["settings"], first_run["client"]
    published = Pipeline(settings).online.current()
    ran = []

    def materialize_if_due() -> str:
        stub = {"materialize": lambda s: ran.append(1) or {"job": "materialize", "namespace": published.namespace}}
        p = Pipeline(settings, jobs=stub)
        events_fp = files_fingerprint(event_files(settings.paths.events_dir))
        p.state.record("materialize", materialize_fingerprint(settings, p.store, events_fp), published.namespace)
        assert p.materialize(events_fp)
        return p.manifest.stages["materialize"].outcome

    assert materialize_if_due() == "skipped" and ran == []
    shortest = min(v.ttl_s for v in published.registry.views.values())
    key = next(client.scan_iter(match=Keys(settings.redis.key_prefix).namespace_pattern(published.namespace), count=1000))
    client.expire(key, shortest // 2 - 86_400)  # as a key left alone for half its TTL and a day
    assert materialize_if_due() == "ok" and ran == [1]


def test_trending_flag_off_skips_the_trending_job(first_run):
    """Runs last: stub jobs (no training time) stand in for the others; only the decision
    about trending is under test."""
    from jobs.pipeline import run_pipeline

    settings = first_run["settings"]
    off = settings.model_copy(update={"flags": settings.flags.model_copy(update={"trending_detection": False})})
    ran = []

    def stub(name):
        def job(settings):
            ran.append(name)  # only observed for jobs run in this process
            return {"job": name, "mismatches": 0, "values": 1}
        return job

    report = run_pipeline(off, jobs={n: stub(n) for n in ("content", "cf", "trending", "materialize", "parity")}, force=True)
    stages = _stages(report)
    assert stages["trending"]["outcome"] == "skipped"
    assert stages["trending"]["reason"] == "flags.trending_detection is off"
    assert stages["content"]["outcome"] == stages["cf"]["outcome"] == "ok"
    assert ran == ["materialize", "parity"]  # content and CF ran as Ray tasks, trending nowhere


ROOT = Path(__file__).resolve().parents[1]


def _rayservice() -> dict:
    """deploy/rayservice.yaml, parsed."""
    import yaml

    return yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())


def test_rayservice_manifest_holds_a_valid_echotune_serve_config():
    """deploy/rayservice.yaml embeds a Serve config: it must validate like ray_config.yaml."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    doc = _rayservice()
    assert doc["kind"] == "RayService"
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    app = next(a for a in serve_config["applications"] if a["name"] == "echotune")
    settings = settings_from_args(app["args"])
    assert settings.redis.url and str(settings.paths.state_dir) == "/data/echotune"


def test_every_rayservice_pod_starts_with_the_cluster_environment():
    """Serve reads its mode from the environment of every process (controller, HAProxy
    manager, replicas): a pod without it would run another Serve than the one tested."""
    from deployments.runtime import CLUSTER_ENV

    spec = _rayservice()["spec"]
    groups = [spec["rayClusterConfig"]["headGroupSpec"], *spec["rayClusterConfig"]["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container["env"]}
            assert {k: env.get(k) for k in CLUSTER_ENV} == CLUSTER_ENV, container["name"]


def test_the_apps_replicas_run_their_router_on_their_own_loop_in_every_config():
    """REPLICA_ENV reaches the replicas through the app's runtime_env: both configs must carry
    it, or a deployed cluster would run a slower Serve than the one measured."""
    import yaml

    from deployments.runtime import REPLICA_ENV

    for name, config in (
        ("ray_config.yaml", yaml.safe_load((ROOT / "ray_config.yaml").read_text())),
        ("deploy/rayservice.yaml", yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])),
    ):
        app = next(a for a in config["applications"] if a["name"] == "echotune")
        env = app.get("runtime_env", {}).get("env_vars", {})
        assert {k: env.get(k) for k in REPLICA_ENV} == REPLICA_ENV, name
