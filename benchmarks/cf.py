"""Collaborative filtering: our ALS against `implicit` on MovieLens 100K and on a
Last.fm-360K-sized synthetic matrix, plus ALS on 1..n Ray workers.

    .venv/bin/python -m benchmarks.cf                        # here: a few minutes on 2 cores
    .venv/bin/python -m benchmarks.cf --splits 2 --large-scale 0.1 --workers 1
    bash benchmarks/cf_16core.sh                              # the same on a 16-core machine

Quality (protocol a of `training.evaluation`: random 80/20 splits of all ratings, full ranking
of unseen items, k=10), mean over `--splits` seeds: our ALS at the point our validation search
picked (`jobs.evaluate_cf`), `implicit`'s ALS at the point the same search picked for it
(DATA.md: 128 factors, regularization 50, alpha 10, binary input), EASE, item-kNN and
popularity. Fit times of both ALS on the same splits, their ratio.

Speed: a synthetic matrix of Last.fm-360K's size (360k users, 160k items, ~17M non-zeros,
Zipf item popularity, play counts), 64 factors, CG with 3 steps for both: seconds per
iteration of `implicit` (all cores), of our single-process ALS (numba CG kernel, all cores),
and of `RayALS` on each `--workers` count (1 CPU and 1 kernel thread per actor; actor start-up,
kernel load and shipping the shards reported apart; actors at the driver's priority, nice 0,
not Ray's default 15, so they compete for a shared machine as the other two do).

Warm-up: before anything is timed, both libraries fit a tiny matrix once in this process.
For `implicit` (compiled ahead of time with Cython) that only starts its thread pool; for us
it also compiles the numba kernel or loads it from numba's on-disk cache, a one-off cost a
Cython library pays at install time. Each Ray actor does the same in its constructor, which
is start-up, not iteration time.

Wall and CPU seconds (all threads of the process) are both printed: on a shared machine the
wall-clock ratio drifts with other load, CPU seconds measure the work. Only
`--large-iterations` iterations are timed: on 2 shared cores a full fit would take many
minutes and the per-iteration time is steady after the first.

`implicit` is the peer, installed with the `bench` extra only. Last stdout line: one JSON
object with ndcg10_als, ndcg10_best, ndcg10_pop, ndcg10_implicit, fit_ratio_vs_implicit,
iter_ratio_vs_implicit_large.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import numpy as np
import scipy.sparse as sp

from app.config import PathSettings
from app.data.movielens import load_movielens_100k
from jobs.evaluate_cf import movielens_matrix
from training.als import ImplicitALS, half_step, warm_up
from training.ease import EASE
from training.evaluation import evaluate, random_split
from training.knn import ItemKNN
from training.popularity import Popularity

OURS = dict(factors=128, regularization=50.0, alpha=9.0, iterations=25, cg_steps=3)
"""Our ALS at the point `jobs.evaluate_cf`'s validation search picked."""
IMPLICIT = dict(factors=128, regularization=50.0, alpha=10.0, iterations=25)
"""implicit's best point on the same protocol and validation procedure (DATA.md)."""


def implicit_als(**params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit's advice about BLAS threads
        from implicit.cpu.als import AlternatingLeastSquares

        return AlternatingLeastSquares(**params, random_state=0, num_threads=0, calculate_training_loss=False)


def warm_both() -> None:
    """Run each ALS once on a tiny matrix so no timed fit pays a one-off start-up cost."""
    tiny = sp.csr_matrix(np.eye(8, dtype=np.float32))
    started = time.perf_counter()
    implicit_als(factors=4, iterations=1).fit(tiny, show_progress=False)
    implicit_s = time.perf_counter() - started
    started = time.perf_counter()
    warm_up()
    print(f"warm-up (not timed below): implicit {implicit_s:.2f}s, ours (numba compile or cache load) "
          f"{time.perf_counter() - started:.2f}s", flush=True)


def movielens(splits: int) -> dict:
    matrix, _ = movielens_matrix(load_movielens_100k(PathSettings().cache_dir).interactions)
    makers = {
        "als": lambda: ImplicitALS(**OURS, seed=0),
        "ease": lambda: EASE(regularization=500.0),
        "item_knn": lambda: ItemKNN(neighbors=200, bm25=True),
        "popularity": Popularity,
    }
    scores = {name: [] for name in [*makers, "implicit"]}
    fit_seconds = {"als": [], "implicit": []}
    fit_cpu = {"als": [], "implicit": []}
    for seed in range(splits):
        train, test = random_split(matrix, 0.2, seed=seed)
        users = np.flatnonzero(np.diff(test.indptr))
        for name, make in makers.items():
            started, cpu = time.perf_counter(), time.process_time()
            model = make().fit(train)
            if name == "als":
                fit_seconds["als"].append(time.perf_counter() - started)
                fit_cpu["als"].append(time.process_time() - cpu)
            scores[name].append(evaluate(model, train, test)["ndcg"])
        reference = implicit_als(**IMPLICIT)
        started, cpu = time.perf_counter(), time.process_time()
        reference.fit(train, show_progress=False)
        fit_seconds["implicit"].append(time.perf_counter() - started)
        fit_cpu["implicit"].append(time.process_time() - cpu)
        ids, _ = reference.recommend(users, train[users], N=10, filter_already_liked_items=True)
        from training.evaluation import ranking_metrics

        scores["implicit"].append(ranking_metrics(ids, test[users], k=10)["ndcg"])
        print(f"split {seed}: " + ", ".join(f"{n} {s[-1]:.4f}" for n, s in scores.items()), flush=True)
    out = {name: (float(np.mean(s)), float(np.std(s))) for name, s in scores.items()}
    for name, (mean, std) in out.items():
        print(f"MovieLens 100K nDCG@10 {name:11s} {mean:.4f} ± {std:.4f}  ({splits} splits)")
    fits = {name: float(np.mean(s)) for name, s in fit_seconds.items()}
    cpus = {name: float(np.mean(s)) for name, s in fit_cpu.items()}
    print(f"fit seconds: ours {fits['als']:.2f}, implicit {fits['implicit']:.2f}, ratio {fits['als'] / fits['implicit']:.2f}")
    print(f"fit CPU seconds (all threads): ours {cpus['als']:.2f}, implicit {cpus['implicit']:.2f}, "
          f"ratio {cpus['als'] / cpus['implicit']:.2f}")
    return {"ndcg": out, "fit_seconds": fits, "fit_cpu_seconds": cpus}


def synthetic(scale: float, seed: int = 0) -> sp.csr_matrix:
    """Last.fm-360K-shaped plays: lognormal user activity, Zipf(0.9) item popularity."""
    rng = np.random.default_rng(seed)
    n_users, n_items, target = int(360_000 * scale), int(160_000 * scale), int(17_500_000 * scale)
    activity = rng.lognormal(3.6, 0.6, n_users)
    per_user = np.maximum(1, np.round(activity * target / activity.sum())).astype(np.int64)
    rows = np.repeat(np.arange(n_users), per_user)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    cols = rng.permutation(n_items)[np.searchsorted(np.cumsum(popularity / popularity.sum()), rng.random(len(rows)))]
    cols = np.minimum(cols, n_items - 1)
    counts = (1 + rng.poisson(3, len(rows))).astype(np.float32)
    matrix = sp.csr_matrix((counts, (rows, cols)), shape=(n_users, n_items))
    matrix.sum_duplicates()
    return matrix


def large(scale: float, iterations: int, workers: list[int]) -> dict:
    started = time.perf_counter()
    R = synthetic(scale)
    print(f"synthetic {R.shape[0]} x {R.shape[1]}, {R.nnz} non-zeros (built in {time.perf_counter() - started:.1f}s)", flush=True)
    params = dict(factors=64, regularization=1.0, alpha=1.0)

    per_iteration: list[float] = []
    reference = implicit_als(**params, iterations=iterations)
    cpu = time.process_time()
    reference.fit(R, show_progress=False, callback=lambda it, elapsed, loss: per_iteration.append(elapsed))
    implicit_cpu = (time.process_time() - cpu) / iterations
    implicit_s = float(np.median(per_iteration))
    print(f"implicit: {implicit_s:.2f} s/iteration, {implicit_cpu:.2f} CPU s/iteration ({iterations} timed)", flush=True)

    # CPU from before the transpose and the initial factors, as implicit's fit does both.
    cpu = time.process_time()
    model = ImplicitALS(**params, iterations=iterations, seed=0)
    X, Y = model.init_factors(*R.shape)
    Rt = R.T.tocsr()
    ours = []
    for _ in range(iterations):
        t = time.perf_counter()
        X = half_step(R, X, Y, 1.0, 1.0, 3, block_size=4096, num_threads=0)
        Y = half_step(Rt, Y, X, 1.0, 1.0, 3, block_size=4096, num_threads=0)
        ours.append(time.perf_counter() - t)
    ours_cpu = (time.process_time() - cpu) / iterations
    ours_s = float(np.median(ours))
    print(f"ours, single process: {ours_s:.2f} s/iteration ({ours_s / implicit_s:.2f}x implicit), "
          f"{ours_cpu:.2f} CPU s/iteration ({ours_cpu / implicit_cpu:.2f}x)", flush=True)

    ray_s = {}
    if workers:
        import ray

        from training.als_ray import RayALS

        tmp = tempfile.mkdtemp(prefix="ray-bench-cf-", dir="/tmp")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray starts workers at nice 15; implicit and our single-process run sit at nice 0 in
        # this driver, so on a shared machine the actors would be timed at a lower priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=max(workers), include_dashboard=False, _temp_dir=tmp,
                 object_store_memory=2 * 1024**3, log_to_driver=False)
        try:
            for n in workers:
                distributed = RayALS(**params, iterations=iterations, seed=0, num_workers=n, cpus_per_worker=1)
                t = time.perf_counter()
                distributed.fit(R)
                total = time.perf_counter() - t
                ray_s[n] = float(np.median(distributed.iteration_seconds))
                setup = total - sum(distributed.iteration_seconds)
                print(f"RayALS, {n} worker(s): {ray_s[n]:.2f} s/iteration ({ray_s[n] / implicit_s:.2f}x implicit), "
                      f"start-up and shard shipping {setup:.1f}s", flush=True)
        finally:
            ray.shutdown()
    return {"shape": list(R.shape), "nnz": int(R.nnz), "implicit_s": implicit_s, "ours_s": ours_s, "ray_s": ray_s,
            "implicit_cpu": implicit_cpu, "ours_cpu": ours_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", type=int, default=5, help="MovieLens random splits.")
    parser.add_argument("--large-scale", type=float, default=1.0, help="Fraction of Last.fm-360K's size.")
    parser.add_argument("--large-iterations", type=int, default=2, help="ALS iterations timed on the large matrix.")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Ray worker counts to time.")
    args = parser.parse_args()

    warm_both()
    ml = movielens(args.splits)
    big = large(args.large_scale, args.large_iterations, args.workers)
    ndcg = {name: mean for name, (mean, _) in ml["ndcg"].items()}
    best = max(ndcg["als"], ndcg["ease"], ndcg["item_knn"])
    summary = {
        "ndcg10_als": round(ndcg["als"], 4),
        "ndcg10_best": round(best, 4),
        "ndcg10_pop": round(ndcg["popularity"], 4),
        "ndcg10_implicit": round(ndcg["implicit"], 4),
        "ndcg10_ease": round(ndcg["ease"], 4),
        "ndcg10_item_knn": round(ndcg["item_knn"], 4),
        "fit_ratio_vs_implicit": round(ml["fit_seconds"]["als"] / ml["fit_seconds"]["implicit"], 2),
        "iter_ratio_vs_implicit_large": round(big["ours_s"] / big["implicit_s"], 2),
        "fit_cpu_ratio_vs_implicit": round(ml["fit_cpu_seconds"]["als"] / ml["fit_cpu_seconds"]["implicit"], 2),
        "iter_cpu_ratio_vs_implicit_large": round(big["ours_cpu"] / big["implicit_cpu"], 2),
        "iter_s_implicit_large": round(big["implicit_s"], 2),
        "iter_s_ours_large": round(big["ours_s"], 2),
        **{f"iter_s_ray_{n}w_large": round(s, 2) for n, s in big["ray_s"].items()},
        "large_shape": big["shape"],
        "large_nnz": big["nnz"],
        "splits": args.splits,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
