"""Tune and evaluate every recommender of `training/` on MovieLens 100K.

    python -m jobs.evaluate_cf --config ray_config.yaml [--splits 5] [--out report.json]
    ray job submit --working-dir . -- python -m jobs.evaluate_cf --config ray_config.yaml

1. Hyperparameter search: a small grid per model (`GRIDS`), each point fitted on 80% of the
   training part of splits 0 and 1 and scored (nDCG@10, mean of the two) on the other 20%,
   never on a test split. One validation split was too noisy: ALS's best regularization
   flipped between 50 and 70 from one split to the next.
2. Protocol (a): the best point of each model on `--splits` random 80/20 splits (seeds
   0..n-1), mean ± std of every metric. Popularity must land on the published 0.2197.
3. Protocol (b): per-user temporal split (each user's last 20% of ratings).
4. Fold-in: held-out users ranked from their first half of ratings (`fold_in`) vs a retrain
   that includes those ratings.

The search ran here picked ALS factors=128, regularization=50, alpha=9 (implicit's best
point: its confidence alpha*R equals our 1 + alpha*R at alpha 9 for binary input, so this is
the same objective), EASE λ=500, ItemKNN with BM25 and 200 neighbours, NMF with 16 factors;
the report lists every grid point so the choice can be checked. Runs in the driver (2 cores here make
parallel trials pointless); a grid point is a plain function call, so Ray Tune could take it
over unchanged on a bigger cluster.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from app.config import Settings
from training.als import ImplicitALS
from training.ease import EASE
from training.evaluation import evaluate, fold_in_vs_retrain, random_split, temporal_split
from training.knn import ItemKNN
from training.nmf import NMFRecommender
from training.popularity import Popularity

log = logging.getLogger(__name__)

GRIDS = {
    "als": (
        lambda **p: ImplicitALS(iterations=25, cg_steps=3, seed=0, **p),
        {"factors": [128], "regularization": [35.0, 50.0, 70.0], "alpha": [9.0]},
    ),
    "ease": (lambda **p: EASE(**p), {"regularization": [200.0, 300.0, 500.0, 800.0]}),
    "item_knn": (lambda **p: ItemKNN(**p), {"neighbors": [50, 100, 200], "bm25": [False, True]}),
    "nmf": (lambda **p: NMFRecommender(max_iter=300, seed=0, **p), {"factors": [8, 16, 32]}),
    "popularity": (lambda **p: Popularity(), {}),
}
"""Model name -> (constructor, grid). Small on purpose: each point is one fit on ML-100K."""

PUBLISHED_NDCG10 = {"MostPop": 0.2197, "ItemKNN": 0.3986, "MF": 0.4402, "BPR-MF": 0.4083, "SLIM": 0.4359}
"""Protocol (a) numbers from Recommenders.jl (DATA.md)."""


def movielens_matrix(interactions) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Binary users x items matrix of ML-100K (every rating a positive) and, with the same
    sparsity, each rating's unix time (for temporal orders)."""
    users = interactions["user_id"].to_numpy() - 1
    items = interactions["item_id"].to_numpy() - 1
    seconds = interactions["timestamp"].astype("datetime64[s, UTC]").astype("int64").to_numpy()
    shape = (int(users.max()) + 1, int(items.max()) + 1)
    ones = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)), shape=shape)
    times = sp.csr_matrix((seconds.astype(np.float64), (users, items)), shape=shape)
    return ones, times


def grid_points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def search(matrix: sp.csr_matrix, folds: int = 2, models: list[str] | None = None) -> dict:
    """Best grid point per model, by mean validation nDCG@10 over validation splits carved out
    of the train parts of splits 0..folds-1."""
    parts = []
    for seed in range(folds):
        train, _ = random_split(matrix, 0.2, seed=seed)
        parts.append(random_split(train, 0.2, seed=seed + 1000))
    results = {}
    for name in models or list(GRIDS):
        make, grid = GRIDS[name]
        trials = []
        for point in grid_points(grid):
            started = time.perf_counter()
            score = float(np.mean([evaluate(make(**point).fit(fit), fit, val)["ndcg"] for fit, val in parts]))
            trials.append({"params": point, "val_ndcg10": round(score, 4), "seconds": round(time.perf_counter() - started, 2)})
            log.info("search %s %s: validation nDCG@10 %.4f", name, point, score)
        best = max(trials, key=lambda t: t["val_ndcg10"])
        results[name] = {"best": best["params"], "trials": trials}
    return results


def protocol_a(matrix: sp.csr_matrix, make, splits: int, item_vectors=None) -> dict:
    """Mean and std of each metric over `splits` random 80/20 splits."""
    runs = []
    for seed in range(splits):
        train, test = random_split(matrix, 0.2, seed=seed)
        started = time.perf_counter()
        model = make().fit(train)
        fit_seconds = time.perf_counter() - started
        runs.append({**evaluate(model, train, test, item_vectors=item_vectors), "fit_seconds": fit_seconds})
    return {
        key: {"mean": round(float(np.mean([r[key] for r in runs])), 4), "std": round(float(np.std([r[key] for r in runs])), 4)}
        for key in runs[0]
    }


def protocol_b(matrix: sp.csr_matrix, times: sp.csr_matrix, make, item_vectors=None) -> dict:
    import pandas as pd

    coo, t = matrix.tocoo(), times.tocoo()
    events = pd.DataFrame({"user": coo.row, "item": coo.col, "timestamp": t.data})
    train, test = temporal_split(events, 0.2, shape=matrix.shape)
    return {k: round(v, 4) for k, v in evaluate(make().fit(train), train, test, item_vectors=item_vectors).items()}


def genre_vectors(items, n_items: int) -> np.ndarray:
    """One-hot genres per item index (for intra-list diversity)."""
    genres = sorted({g for gs in items["genres"] for g in gs})
    vectors = np.zeros((n_items, len(genres)))
    column = {g: j for j, g in enumerate(genres)}
    for item_id, gs in zip(items["item_id"], items["genres"]):
        for g in gs:
            vectors[item_id - 1, column[g]] = 1
    return vectors


def evaluate_cf(settings: Settings, splits: int = 5, models: list[str] | None = None) -> dict:
    from app.data.movielens import load_movielens_100k

    ml = load_movielens_100k(settings.paths.cache_dir)
    matrix, times = movielens_matrix(ml.interactions)
    genres = genre_vectors(ml.items, matrix.shape[1])
    chosen = search(matrix, models=models)
    report = {"published_ndcg10": PUBLISHED_NDCG10, "search": chosen, "protocol_a": {}, "protocol_b": {}, "fold_in": {}}
    for name, found in chosen.items():
        make = (lambda make=GRIDS[name][0], best=found["best"]: make(**best))
        report["protocol_a"][name] = protocol_a(matrix, make, splits, genres)
        report["protocol_b"][name] = protocol_b(matrix, times, make, genres)
        if name != "popularity":
            order = times.tocsr().data  # same sparsity as `matrix`: each rating's time
            result = fold_in_vs_retrain(make, matrix, order=order)
            report["fold_in"][name] = {k: round(v, 4) for k, v in result.items()}
        log.info("%s: protocol (a) nDCG@10 %s", name, report["protocol_a"][name]["ndcg"])
    return report


def main() -> None:
    from jobs.common import parse_args, print_summary

    def extra(parser):
        parser.add_argument("--splits", type=int, default=5, help="Random splits for protocol (a).")
        parser.add_argument("--models", nargs="*", choices=list(GRIDS), help="Subset of models (default all).")
        parser.add_argument("--out", type=Path, help="Also write the full report here as JSON.")

    args, settings = parse_args(__doc__, extra)
    report = evaluate_cf(settings, splits=args.splits, models=args.models)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print_summary({name: r["ndcg"] for name, r in report["protocol_a"].items()})


if __name__ == "__main__":
    main()
