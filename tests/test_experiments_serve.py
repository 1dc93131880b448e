"""Experiments through Ray: the evaluator job on Ray Data over event Parquet, and the automatic
rollback end to end: the job's critical breach sets the kill switch and the running Serve app
stops assigning the variant within seconds."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from app.config import settings_from_args
from app.experiments.definitions import Experiment, Variant
from app.experiments.metrics import MetricsAccumulator, combine_exposures, exposure_partial
from app.experiments.registry import ExperimentRegistry
from app.experiments.simulate import Effect, EventSimulation, simulate_events
from app.keys import Keys
from tests.waiting import poll

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_server, serve_port):
    from ray import serve

    from app.events.auth import ApiKeyStore
    from deployments.app import build_app

    import redis

    prefix = f"exp{uuid.uuid4().hex[:6]}"
    args = {
        "redis": {"url": redis_server.url, "key_prefix": prefix, "stream_key": f"{prefix}:events"},
        "paths": {"state_dir": str(tmp_path_factory.mktemp("state"))},
        "experiments": {"refresh_interval_s": 0.5},
    }
    settings = settings_from_args(args)
    client = redis.Redis.from_url(redis_server.url)
    registry = ExperimentRegistry(client, Keys(prefix))
    registry.create(Experiment(name="skips", variants=[Variant(name="control", weight=1), Variant(name="treatment", weight=1, params={"mmr_lambda": 0.3})]))
    registry.start("skips")
    name = f"experiments-{prefix}"
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    key = ApiKeyStore(client, Keys(prefix)).create({"read"}).token
    api = httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/{name}", timeout=60, headers={"Authorization": f"Bearer {key}"})
    yield settings, registry, api
    api.close()
    serve.delete(name)


def _variants(api, users):
    out = {}
    for u in users:
        resp = api.get(f"/v1/users/{u}/recommendations", params={"k": 5})
        assert resp.status_code == 200, resp.text
        out[u] = resp.json()["variant"]
    return out


def test_critical_breach_rolls_back_and_serving_stops_assigning_the_variant(served, tmp_path):
    from jobs.evaluate_experiment import evaluate_experiment

    settings, registry, api = served
    users = [f"u{i}" for i in range(30)]
    before = _variants(api, users)
    assert set(before.values()) == {"control", "treatment"}

    # A week of events in which the treatment makes listeners skip 40% more.
    sim = EventSimulation(experiment="skips", n_users=1500, seed=9, start_ms=registry.get("skips").started_at_ms, effects={"treatment": Effect(skip=0.4)})
    events, catalogue = simulate_events(sim)
    day = time.strftime("%Y-%m-%d", time.gmtime(sim.start_ms / 1000))
    events_dir = tmp_path / "events"
    (events_dir / f"date={day}").mkdir(parents=True)
    half = events.num_rows // 2
    pq.write_table(events.slice(0, half), events_dir / f"date={day}" / "part-0.parquet")
    pq.write_table(events.slice(half), events_dir / f"date={day}" / "part-1.parquet")
    pq.write_table(catalogue, tmp_path / "tracks.parquet")

    summary = evaluate_experiment(settings, "skips", registry, events_dir=events_dir, catalogue=tmp_path / "tracks.parquet", out_dir=tmp_path / "report")
    assert summary["decisions"] == {"treatment": "roll back"} and summary["rolled_back"] == ["treatment"]
    assert "skips/treatment" in registry.killed()
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "skip_rate" in doc["decisions"][0]["recommendation"]
    assert "<svg" in (tmp_path / "report" / "report.html").read_text()

    # Ray Data's per-block partials merge to exactly the single-process result.
    exposures = combine_exposures([exposure_partial(events, "skips")], ["control", "treatment"])
    genres = pc.dictionary_encode(catalogue["genre"].combine_chunks()).indices.to_numpy().astype(np.int64)
    acc = MetricsAccumulator(exposures, "skips", catalogue["track_id"].combine_chunks(), genres, 7 * 86_400_000)
    local = acc.finish(acc.add(events))
    assert doc["users"] == {"control": local.users("control"), "treatment": local.users("treatment")}
    skip = next(m for m in doc["metrics"] if m["metric"] == "skip_rate")
    assert skip["treatment_value"] == pytest.approx(local.arm("treatment", "skips").sum() / local.arm("treatment", "plays").sum(), rel=1e-12)

    # A later run reports the rolled-back variant only up to its kill (the simulated week lies
    # after it: nothing of the treatment is left) and neither decides on nor kills it again.
    kill = registry.killed()["skips/treatment"]
    again = evaluate_experiment(settings, "skips", registry, events_dir=events_dir, catalogue=tmp_path / "tracks.parquet", out_dir=tmp_path / "report2")
    assert again["decisions"] == {} and again["rolled_back"] == [] and registry.killed()["skips/treatment"] == kill
    assert again["users"]["control"] == local.users("control") and again["users"]["treatment"] < local.users("treatment")

    # The running app stops assigning the killed variant; control users stay in the experiment.
    # Until the replicas' refresh has read the kill switch.
    after = poll(lambda: _variants(api, users), lambda a: all(a[u] is None for u in users if before[u] == "treatment"), 500)
    assert all(after[u] is None for u in users if before[u] == "treatment")
    assert all(after[u] == "control" for u in users if before[u] == "control")
