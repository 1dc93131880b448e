"""ALS on Ray actors gives the factors a single-process fit gives, and is a full Recommender.

    .venv/bin/pytest tests/test_als_ray.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from app.config import CFSettings
from training.als import ImplicitALS, half_step
from training.als_ray import ALSShard, RayALS, balanced_cuts

PARAMS = dict(factors=6, regularization=2.0, alpha=5.0, iterations=6, cg_steps=3, seed=4, block_size=16)


def interactions(n_users=90, n_items=70, seed=0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    matrix = sp.random(n_users, n_items, density=0.08, random_state=seed, format="csr", dtype=np.float32)
    matrix.data = rng.integers(1, 5, size=matrix.nnz).astype(np.float32)
    heavy = sp.csr_matrix((np.ones(n_items, dtype=np.float32), (np.zeros(n_items, int), np.arange(n_items))),
                          shape=matrix.shape)
    return matrix + heavy  # user 0 played everything: an unbalanced shard if split by rows


def test_balanced_cuts_cover_rows_and_balance_work():
    indptr = np.r_[0, np.cumsum([100] + [1] * 99)]  # one heavy row, 99 light ones
    cuts = balanced_cuts(indptr, 2)
    assert cuts[0][0] == 0 and cuts[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert cuts[0][1] < 40  # the heavy row's shard holds fewer rows than an even split (50)
    assert balanced_cuts(np.array([0, 1, 2]), 5) == [(0, 1), (1, 2)]  # never more shards than rows
    assert balanced_cuts(np.array([0]), 3) == [(0, 0)]


def test_shard_solves_like_the_serial_half_step():
    R = interactions()
    X, Y = ImplicitALS(**PARAMS).init_factors(*R.shape)
    shard = ALSShard(R[10:40], R.T.tocsr()[:5], X[10:40], Y[:5], 2.0, 5.0, 3, 16)
    expected = half_step(R, X, Y, 2.0, 5.0, 3, block_size=16)[10:40]
    np.testing.assert_allclose(shard.solve("users", Y, Y.T @ Y), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.ray
def test_ray_fit_matches_single_process(ray_cluster):
    R = interactions()
    local = ImplicitALS(**PARAMS).fit(R)
    distributed = RayALS(**PARAMS, num_workers=3, cpus_per_worker=0.25).fit(R)
    np.testing.assert_allclose(distributed.user_factors, local.user_factors, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(distributed.item_factors, local.item_factors, rtol=1e-3, atol=1e-5)
    users = np.arange(R.shape[0])
    np.testing.assert_array_equal(distributed.recommend_batch(users, R, k=5)[0], local.recommend_batch(users, R, k=5)[0])


@pytest.mark.ray
def test_more_workers_than_rows(ray_cluster):
    R = interactions(n_users=2, n_items=40)
    local = ImplicitALS(**PARAMS).fit(R)
    distributed = RayALS(**PARAMS, num_workers=3, cpus_per_worker=0.1).fit(R)
    np.testing.assert_allclose(distributed.user_factors, local.user_factors, rtol=1e-3, atol=1e-5)


def test_settings_and_bad_parameters():
    model = RayALS.from_settings(CFSettings(factors=5, ray_workers=3, ray_cpus_per_worker=0.5, block_size=64))
    assert (model.factors, model.num_workers, model.cpus_per_worker, model.block_size) == (5, 3, 0.5, 64)
    with pytest.raises(ValueError, match="num_workers"):
        RayALS(num_workers=0)
    with pytest.raises(ValueError, match="cpus_per_worker"):
        RayALS(cpus_per_worker=-1)


# --- the job: events Parquet -> Ray ALS -> evaluated, versioned artifact -------------------


def write_events(folder, rows: list[tuple]) -> None:
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=["user_id", "track_id", "event_type"]).astype(object)
    frame.to_parquet(folder / "part-0.parquet")


def job_settings(tmp_path, redis_url: str | None = None, **cf):
    import uuid

    from app.config import settings_from_args

    cf = {"factors": 4, "iterations": 3, "ray_workers": 1, "ray_cpus_per_worker": 0.25, **cf}
    redis = {"url": redis_url, "dead_letter_key": f"dlq:{uuid.uuid4().hex}"} if redis_url else {}
    return settings_from_args({"paths": {"state_dir": str(tmp_path)}, "cf": cf, "redis": redis})


def test_unusable_event_rows_pass_through_with_their_reason():
    """Summed weights for usable rows; a known type without weight (pause) just weighs 0; a row
    without ids or with a missing or unknown type comes back as it was, with why."""
    import pandas as pd

    from jobs.train_cf import WeightEvents

    batch = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", None, "u2", "u3", "u4"],
            "track_id": ["t1", "t1", "t2", "t1", None, "t1", "t1"],
            "event_type": ["play", "like", "pause", "play", "like", "teleport", None],
        }
    )
    out = WeightEvents({"play": 1.0, "like": 4.0})(batch)
    usable = out[out["reason"].isna()]
    assert usable[["user_id", "track_id", "weight"]].values.tolist() == [["u1", "t1", 5.0]]
    bad = out[out["reason"].notna()].astype(object).where(out.notna(), None)
    assert bad[["user_id", "track_id", "event_type", "reason"]].values.tolist() == [
        [None, "t1", "play", "no_user_or_track_id"],
        ["u2", None, "like", "no_user_or_track_id"],
        ["u3", "t1", "teleport", "unknown_event_type"],
        ["u4", "t1", None, "unknown_event_type"],
    ]


@pytest.mark.ray
def test_train_cf_job_publishes_evaluated_artifact(ray_cluster, redis_server, tmp_path):
    """String and non-contiguous ids, duplicates, single-event users, skips, missing ids and
    unknown event types (those two counted and dead-lettered, once however often the job runs)."""
    import json

    import pandas as pd
    import redis

    from app.artifacts import ArtifactStore
    from app.events.dead_letter import DeadLetterQueue
    from jobs.train_cf import load_interactions, train_cf

    rng = np.random.default_rng(0)
    rows = [(f"u{u * 7}", f"t{rng.integers(0, 30) * 3}", "play") for u in range(40) for _ in range(12)]
    rows += [("u7", "t0", "play")] * 3 + [("u7", "t0", "like")]  # duplicates add up
    rows += [("lonely", "t999", "play"), ("u0", "t3", "skip"), (None, "t3", "play"), ("u0", None, "like")]
    rows += [("u0", "t3", "teleport"), ("u0", "t3", None)]
    write_events(tmp_path / "events" / "date=2024-01-01", rows)

    settings = job_settings(tmp_path, redis_server.url)
    summary = train_cf(settings)
    store = ArtifactStore(tmp_path / "artifacts")
    artifact = store.latest("cf")
    assert summary["version"] == artifact.version and store.verify(artifact) == []
    users = pd.read_parquet(artifact.file("users.parquet"))["user_id"].tolist()
    items = pd.read_parquet(artifact.file("items.parquet"))["track_id"].tolist()
    assert "lonely" in users and "t999" in items and None not in users
    assert np.load(artifact.file("user_factors.npy")).shape == (len(users), 4)
    assert np.load(artifact.file("item_factors.npy")).shape == (len(items), 4)
    manifest = json.loads(artifact.file("manifest.json").read_text())
    assert manifest["data"]["dropped_rows"] == 2 and len(manifest["data"]["interactions_sha256"]) == 64
    assert manifest["data"]["unknown_event_type_rows"] == 2
    dead = DeadLetterQueue(redis.Redis.from_url(redis_server.url), settings.redis.dead_letter_key).entries()
    assert sorted((e["source"], e["reason"]) for e in dead) == [("train_cf", "no_user_or_track_id")] * 2 + [("train_cf", "unknown_event_type")] * 2
    assert any(json.loads(e["record"]) == {"user_id": "u0", "track_id": "t3", "event_type": "teleport"} for e in dead)
    load_interactions(settings)  # the next run reads the same events: no letter is written twice
    assert len(DeadLetterQueue(redis.Redis.from_url(redis_server.url), settings.redis.dead_letter_key)) == 4
    assert set(manifest["metrics"]["als"]) >= {"ndcg", "precision", "recall", "map", "hit_rate", "coverage"}
    assert manifest["model"] == "RayALS" and manifest["params"]["ray_workers"] == 1
    assert set(manifest["files"]) == {"users.parquet", "items.parquet", "user_factors.npy", "item_factors.npy"}


def test_train_cf_job_refuses_empty_input(tmp_path):
    from app.artifacts import ArtifactStore
    from jobs.train_cf import EmptyInteractionsError, interaction_matrix, train_cf

    import pandas as pd

    with pytest.raises(EmptyInteractionsError, match="no event Parquet"):
        train_cf(job_settings(tmp_path))
    with pytest.raises(EmptyInteractionsError, match="no interactions"):
        interaction_matrix(pd.DataFrame({"user_id": ["a"], "track_id": ["b"], "weight": [0.0]}))
    assert ArtifactStore(tmp_path / "artifacts").latest_version("cf") is None


def test_interaction_matrix_maps_ids():
    import pandas as pd

    from jobs.train_cf import interaction_matrix

    agg = pd.DataFrame({"user_id": [10, 3, 10, 3], "track_id": ["z", "a", "a", "a"], "weight": [1.0, 2.0, 1.0, 3.0]})
    matrix, users, items = interaction_matrix(agg)
    assert users.tolist() == [3, 10] and items.tolist() == ["a", "z"]
    assert matrix.toarray().tolist() == [[5.0, 0.0], [1.0, 1.0]]
