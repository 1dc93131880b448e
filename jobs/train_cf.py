"""Train implicit-feedback ALS on Ray, evaluate it, and publish a versioned `cf` artifact.

    ray job submit --working-dir . -- python -m jobs.train_cf --config ray_config.yaml
    ray job submit --working-dir . -- python -m jobs.train_cf --config ray_config.yaml --movielens

Input: the exported event Parquet (Ray Data weighs each event by type and sums per
(user, track) in `map_batches`; the driver combines the partial sums), or with `--movielens`
MovieLens 100K (every rating a positive, weight 1), published as `cf-movielens` so it never
replaces the music model. Fitting runs on `cf.ray_workers` Ray actors (`training.als_ray`);
0 fits in this process.

Before publishing, a model fitted on a random `cf.eval_fraction` split (protocol a,
`training.evaluation`) is measured against popularity on the held-out part; the numbers go
into the manifest next to the parameters and a snapshot of the input (files, sizes, a digest
of the aggregated interactions). The published factors are then fitted on all the data.
`ArtifactStore` writes the sha256 of every file and flips `LATEST` only once all is written.

Input rules: ids may be strings or non-contiguous integers (they are mapped to contiguous
indices; `users.parquet`/`items.parquet` hold the original ids in row order); duplicate events
add up; users and items with a single event are kept (ALS gives them a vector; they just count
little); rows without a user or track id (`dropped_rows`) and rows whose event type is missing
or unknown (`unknown_event_type_rows`) are counted, dead-lettered with that reason (once: a
later run that meets the same rows does not write them again) and skipped; a known type the
weights leave out (a pause, say) weighs 0. No usable interaction at all fails the job with a
message saying so, and the previous version stays.
Hyperparameter defaults come from `jobs.evaluate_cf` (a grid on a validation split).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from app.artifacts import ArtifactStore
from app.config import CFSettings, Settings
from app.schemas import EventType
from jobs.common import event_files, timed

log = logging.getLogger(__name__)


class EmptyInteractionsError(ValueError):
    """Nothing to train on: the job stops before touching the published model."""


class WeightEvents:
    """Weigh events by type and sum per (user, track) within one batch; skips weigh 0 and go.

    A partial aggregate per batch keeps the shuffle off Ray Data (its hash groupby is much
    slower than pandas at these sizes); the driver sums the partials. A row that is no usable
    event passes through as it came, with its `reason`, for the driver to count and dead-letter.
    """

    COLUMNS = ["user_id", "track_id", "weight", "event_type", "reason"]

    def __init__(self, weights: dict[str, float]):
        self.weights = weights
        self.known_types = {t.value for t in EventType} | set(weights)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        weight = batch["event_type"].map(self.weights).fillna(0.0).astype("float64")
        has_ids = batch["user_id"].notna() & batch["track_id"].notna()
        valid = has_ids & batch["event_type"].isin(self.known_types)
        out = batch.loc[valid & (weight > 0), ["user_id", "track_id"]].copy()
        out["weight"] = weight[valid & (weight > 0)]
        out = out.groupby(["user_id", "track_id"], as_index=False, sort=False)["weight"].sum()
        out["event_type"] = None
        out["reason"] = None
        bad = batch.loc[~valid, ["user_id", "track_id", "event_type"]].copy()
        bad["weight"] = 0.0
        bad["reason"] = np.where(has_ids[~valid], "unknown_event_type", "no_user_or_track_id")
        return (pd.concat([out, bad], ignore_index=True) if len(bad) else out)[self.COLUMNS]


def load_interactions(settings: Settings) -> tuple[pd.DataFrame, dict]:
    """(user_id, track_id, weight) summed over all events, and a snapshot of the input."""
    import ray

    files = event_files(settings.paths.events_dir)
    if not files:
        raise EmptyInteractionsError(
            f"no event Parquet under {settings.paths.events_dir}: run jobs.export_events first"
        )
    ds = ray.data.read_parquet(files, columns=["user_id", "track_id", "event_type"])
    partial = ds.map_batches(WeightEvents(dict(settings.cf.event_weights)), batch_format="pandas").to_pandas()
    if partial.empty:
        partial = pd.DataFrame(columns=WeightEvents.COLUMNS)
    bad = partial[partial["reason"].notna()]
    _dead_letter(settings, bad)
    agg = partial[partial["reason"].isna()].groupby(["user_id", "track_id"], as_index=False, sort=False)["weight"].sum()
    snapshot = {
        "source": "events",
        "files": [{"path": f, "bytes": Path(f).stat().st_size} for f in files],
        "dropped_rows": int((bad["reason"] == "no_user_or_track_id").sum()),
        "unknown_event_type_rows": int((bad["reason"] == "unknown_event_type").sum()),
    }
    return agg, snapshot


def _dead_letter(settings: Settings, bad: pd.DataFrame) -> None:
    """Each row that is no usable event, with its reason."""
    if bad.empty:
        return
    from app.events.dead_letter import DeadLetterQueue
    from app.redis_server import connect

    letters = (
        ({k: None if pd.isna(row[k]) else row[k] for k in ("user_id", "track_id", "event_type")}, row["reason"])
        for row in bad.to_dict("records")
    )
    # Every run reads every exported event: rows dead-lettered by an earlier run are not again.
    written = DeadLetterQueue(connect(settings), settings.redis.dead_letter_key).put_many("train_cf", letters, once=True)
    log.warning(
        "%d event rows are not usable events (by reason: %s); %d newly dead-lettered, the rest were by an earlier run",
        len(bad), bad["reason"].value_counts().to_dict(), written,
    )


def load_movielens(settings: Settings) -> tuple[pd.DataFrame, dict]:
    from app.data.movielens import load_movielens_100k

    ml = load_movielens_100k(settings.paths.cache_dir)
    frame = ml.interactions.rename(columns={"item_id": "track_id"})[["user_id", "track_id"]]
    frame = frame.groupby(["user_id", "track_id"], as_index=False).size().rename(columns={"size": "weight"})
    frame["weight"] = 1.0  # protocol (a): every rating is a positive, whatever its value
    return frame, {"source": "movielens-100k", "files": [{"path": str(ml.source)}], "dropped_rows": 0}


def _ids(values: pd.Series) -> np.ndarray:
    """Sortable ids: mixed types (e.g. ints and strings from different exports) compare as strings."""
    array = values.to_numpy()
    if array.dtype == object and len({type(v) for v in array[:1000]}) > 1:
        array = array.astype(str)
    return array


def interaction_matrix(agg: pd.DataFrame) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Users x items CSR of summed weights, with the original ids of its rows and columns."""
    if agg.empty or not (agg["weight"] > 0).any():
        raise EmptyInteractionsError("no interactions with a positive weight: nothing to train CF on")
    agg = agg[agg["weight"] > 0]
    user_ids, items_ids = _ids(agg["user_id"]), _ids(agg["track_id"])
    users, rows = np.unique(user_ids, return_inverse=True)
    items, cols = np.unique(items_ids, return_inverse=True)
    matrix = sp.csr_matrix(
        (agg["weight"].to_numpy(np.float32), (rows.ravel(), cols.ravel())), shape=(len(users), len(items))
    )
    matrix.sum_duplicates()  # duplicate (user, item) rows add up
    return matrix, users, items


def matrix_digest(matrix: sp.csr_matrix) -> str:
    """sha256 of the CSR arrays: names the exact data a version was trained on."""
    h = hashlib.sha256()
    for part in (np.asarray(matrix.shape, dtype=np.int64), matrix.indptr.astype(np.int64),
                 matrix.indices.astype(np.int64), matrix.data.astype(np.float32)):
        h.update(part.tobytes())
    return h.hexdigest()


def make_als(cf: CFSettings):
    """RayALS on `cf.ray_workers` actors, or the in-process ImplicitALS when it is 0."""
    from training.als import ImplicitALS
    from training.als_ray import RayALS

    if cf.ray_workers == 0:
        return ImplicitALS.from_settings(cf, block_size=cf.block_size)
    return RayALS.from_settings(cf)


def holdout_metrics(matrix: sp.csr_matrix, cf: CFSettings, k: int = 10) -> dict:
    """ALS and popularity on a protocol (a) split: the number a reader of the manifest wants."""
    from training.evaluation import evaluate, random_split
    from training.popularity import Popularity

    train, test = random_split(matrix, test_fraction=cf.eval_fraction, seed=cf.seed)
    if test.nnz == 0 or train.nnz == 0:
        log.warning("too few interactions (%d) for a holdout evaluation; skipped", matrix.nnz)
        return {}
    als = make_als(cf).fit(train)
    return {
        "protocol": f"random {1 - cf.eval_fraction:.0%}/{cf.eval_fraction:.0%} split, k={k}",
        "als": evaluate(als, train, test, k=k),
        "popularity": evaluate(Popularity().fit(train), train, test, k=k),
    }


def train_cf(settings: Settings, source: str = "events") -> dict:
    if source not in ("events", "movielens"):
        raise ValueError(f"source must be 'events' or 'movielens', got {source!r}")
    with timed("load interactions"):
        agg, snapshot = load_interactions(settings) if source == "events" else load_movielens(settings)
    matrix, users, items = interaction_matrix(agg)
    snapshot["interactions_sha256"] = matrix_digest(matrix)
    log.info("interaction matrix %d users x %d tracks, %d non-zeros", *matrix.shape, matrix.nnz)
    cf = settings.cf
    metrics = {}
    if cf.eval_fraction > 0:
        with timed("holdout evaluation"):
            metrics = holdout_metrics(matrix, cf)
        if metrics:
            log.info("holdout nDCG@10: ALS %.4f, popularity %.4f", metrics["als"]["ndcg"], metrics["popularity"]["ndcg"])
    with timed("fit ALS") as t:
        model = make_als(cf).fit(matrix)
    name = "cf" if source == "events" else "cf-movielens"
    store = ArtifactStore(settings.paths.artifacts_dir)
    meta = {
        "params": cf.model_dump(),
        "model": type(model).__name__,
        "users": len(users),
        "items": len(items),
        "nnz": int(matrix.nnz),
        "fit_seconds": t["seconds"],
        "data": snapshot,
        "metrics": metrics,
    }
    with store.publish(name, meta) as out:
        pd.DataFrame({"user_id": users}).to_parquet(out / "users.parquet")
        pd.DataFrame({"track_id": items}).to_parquet(out / "items.parquet")
        np.save(out / "user_factors.npy", model.user_factors)
        np.save(out / "item_factors.npy", model.item_factors)
    summary = {k: v for k, v in meta.items() if k != "data"}
    return {"job": "train_cf", "artifact": name, "version": store.latest_version(name), **summary}


def main() -> None:
    from jobs.common import init_ray, parse_args, print_summary

    def extra(parser):
        parser.add_argument("--movielens", action="store_true", help="Train on MovieLens 100K (artifact cf-movielens).")

    args, settings = parse_args(__doc__, extra)
    init_ray()
    print_summary(train_cf(settings, source="movielens" if args.movielens else "events"))


if __name__ == "__main__":
    main()
