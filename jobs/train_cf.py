"""Train implicit-feedback ALS on the exported events and publish the `cf` artifact.

    ray job submit --working-dir . -- python -m jobs.train_cf --config ray_config.yaml

Ray Data reads the event Parquet, weights each event by type and sums per (user, track);
the aggregated matrix is small enough to factorise in the job's driver.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from app.artifacts import ArtifactStore
from app.config import Settings
from jobs.common import event_files, timed

log = logging.getLogger(__name__)


class WeightEvents:
    """Map event types to interaction weights; rows weighing 0 (skips) are dropped."""

    def __init__(self, weights: dict[str, float]):
        self.weights = weights

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        weight = batch["event_type"].map(self.weights).fillna(0.0).astype("float64")
        out = batch.loc[weight > 0, ["user_id", "track_id"]].copy()
        out["weight"] = weight[weight > 0]
        return out


def load_interactions(settings: Settings) -> pd.DataFrame:
    import ray

    files = event_files(settings.paths.events_dir)
    if not files:
        raise RuntimeError(f"no event Parquet under {settings.paths.events_dir}: run jobs.export_events first")
    ds = ray.data.read_parquet(files, columns=["user_id", "track_id", "event_type"])
    ds = ds.map_batches(WeightEvents(dict(settings.cf.event_weights)), batch_format="pandas")
    agg = ds.groupby(["user_id", "track_id"]).sum("weight").to_pandas()
    return agg.rename(columns={"sum(weight)": "weight"})


def interaction_matrix(agg: pd.DataFrame) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    users = np.sort(agg["user_id"].unique())
    items = np.sort(agg["track_id"].unique())
    rows = np.searchsorted(users, agg["user_id"].to_numpy())
    cols = np.searchsorted(items, agg["track_id"].to_numpy())
    matrix = sp.csr_matrix((agg["weight"].to_numpy(np.float32), (rows, cols)), shape=(len(users), len(items)))
    return matrix, users, items


def train_cf(settings: Settings) -> dict:
    from training.als import ImplicitALS

    with timed("load interactions"):
        agg = load_interactions(settings)
    matrix, users, items = interaction_matrix(agg)
    log.info("interaction matrix %d users x %d tracks, %d non-zeros", *matrix.shape, matrix.nnz)
    with timed("fit ALS") as t:
        model = ImplicitALS.from_settings(settings.cf).fit(matrix)
    store = ArtifactStore(settings.paths.artifacts_dir)
    meta = {"params": settings.cf.model_dump(), "users": len(users), "items": len(items), "nnz": int(matrix.nnz), "fit_seconds": t["seconds"]}
    with store.publish("cf", meta) as out:
        pd.DataFrame({"user_id": users}).to_parquet(out / "users.parquet")
        pd.DataFrame({"track_id": items}).to_parquet(out / "items.parquet")
        np.save(out / "user_factors.npy", model.user_factors)
        np.save(out / "item_factors.npy", model.item_factors)
    return {"job": "train_cf", "version": store.latest_version("cf"), **meta}


def main() -> None:
    from jobs.common import init_ray, parse_args, print_summary

    _, settings = parse_args(__doc__)
    init_ray()
    print_summary(train_cf(settings))


if __name__ == "__main__":
    main()
