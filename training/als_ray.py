"""ALS distributed on Ray: each worker actor owns a shard of users and a shard of items.

The math is `training.als` unchanged; this module only decides who solves which rows.
Per half-step the driver puts the fixed side's factors (and their Gram matrix, computed once)
into the object store; every actor solves its shard with `half_step` against that one shared
copy (zero-copy on the driver's node, fetched once per node elsewhere) and returns its new
rows, which the driver stacks. Each actor keeps its rows of the interaction matrix and of both
factor matrices between iterations, so only factors cross the network, never interactions.

Rows are solved independently of how they are sharded (each by one thread of the same compiled
kernel), so `RayALS` gives the same factors as `ImplicitALS` with the same seed. An actor runs
the kernel on as many threads as whole CPUs it reserves (at least one), so the Ray resources
it asks for are the cores it uses.

    model = RayALS(factors=64, num_workers=4, cpus_per_worker=1).fit(user_items)  # inside ray.init()
"""

from __future__ import annotations

import logging
import time

import numpy as np
import scipy.sparse as sp

from app.config import CFSettings
from training.als import ImplicitALS, half_step, warm_up

log = logging.getLogger(__name__)


def balanced_cuts(indptr: np.ndarray, n_shards: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges with about equal non-zeros (plus rows), one per shard.

    Balancing on non-zeros, not rows, because a shard's work is its gathers and scatters; the
    row count is added so that empty rows (whose dense part still costs) are spread too.
    """
    n_rows = len(indptr) - 1
    n_shards = max(1, min(n_shards, n_rows)) if n_rows else 1
    work = np.asarray(indptr, dtype=np.float64) + np.arange(n_rows + 1)
    targets = work[-1] * np.arange(1, n_shards) / n_shards
    inner = np.searchsorted(work, targets).tolist()
    edges = [0, *inner, n_rows]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a] or [(0, n_rows)]


class ALSShard:
    """One worker's rows: a slice of users (rows of R) and a slice of items (rows of Rᵀ).

    Plain Python so it is testable without Ray; `RayALS` runs it as an actor.
    """

    def __init__(
        self,
        user_rows: sp.csr_matrix,
        item_rows: sp.csr_matrix,
        user_factors: np.ndarray,
        item_factors: np.ndarray,
        regularization: float,
        alpha: float,
        cg_steps: int,
        block_size: int,
        num_threads: int = 1,
    ) -> None:
        self.rows = {"users": sp.csr_matrix(user_rows), "items": sp.csr_matrix(item_rows)}
        self.factors = {"users": np.array(user_factors), "items": np.array(item_factors)}
        self.params = (regularization, alpha, cg_steps, block_size)
        self.num_threads = num_threads
        warm_up()  # compile (or load) the kernel now: start-up cost, not the first iteration's

    def solve(self, side: str, fixed: np.ndarray, gram: np.ndarray) -> np.ndarray:
        """New factors of this shard's `side` rows ("users" or "items") against `fixed`."""
        regularization, alpha, cg_steps, block_size = self.params
        self.factors[side] = half_step(
            self.rows[side], self.factors[side], fixed, regularization, alpha, cg_steps, block_size, YtY=gram,
            num_threads=self.num_threads,
        )
        return self.factors[side]


class RayALS(ImplicitALS):
    """`ImplicitALS` whose half-steps run on `num_workers` Ray actors.

    Needs a connected Ray (`ray.init()` or a job on a cluster). `cpus_per_worker` is what each
    actor reserves: 1 on a dedicated cluster; a fraction on a small machine shared with other
    jobs so the fit does not wait for whole free cores. An actor's kernel threads are its whole
    reserved CPUs (at least one); `num_threads` only applies to an in-process `ImplicitALS`.
    """

    def __init__(self, *, num_workers: int = 2, cpus_per_worker: float = 1.0, **params) -> None:
        super().__init__(**params)
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if cpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker must be >= 0, got {cpus_per_worker}")
        self.num_workers = int(num_workers)
        self.cpus_per_worker = float(cpus_per_worker)
        self.iteration_seconds: list[float] = []

    @classmethod
    def from_settings(cls, settings: CFSettings, block_size: int | None = None) -> "RayALS":
        return cls(
            **cls.params_from(settings),
            block_size=block_size or settings.block_size,
            num_workers=settings.ray_workers,
            cpus_per_worker=settings.ray_cpus_per_worker,
        )

    def _fit(self, user_items: sp.csr_matrix) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("RayALS needs a connected Ray: call ray.init() (a Ray job already is)")
        item_users = user_items.T.tocsr()
        X, Y = self.init_factors(*user_items.shape)
        user_cuts = balanced_cuts(user_items.indptr, self.num_workers)
        item_cuts = balanced_cuts(item_users.indptr, self.num_workers)
        # Fewer rows than workers on one side: pad with empty ranges so shards pair up.
        n_shards = max(len(user_cuts), len(item_cuts))
        user_cuts += [(X.shape[0], X.shape[0])] * (n_shards - len(user_cuts))
        item_cuts += [(Y.shape[0], Y.shape[0])] * (n_shards - len(item_cuts))
        threads = max(1, int(self.cpus_per_worker))
        params = (self.regularization, self.alpha, self.cg_steps, self.block_size, threads)
        Shard = ray.remote(ALSShard).options(num_cpus=self.cpus_per_worker)
        shards = [
            Shard.remote(user_items[ua:ub], item_users[ia:ib], X[ua:ub], Y[ia:ib], *params)
            for (ua, ub), (ia, ib) in zip(user_cuts, item_cuts)
        ]
        log.info(
            "RayALS: %d users x %d items on %d actors (%.2f CPU each)",
            *user_items.shape, len(shards), self.cpus_per_worker,
        )
        self.iteration_seconds = []
        try:
            for iteration in range(self.iterations):
                started = time.perf_counter()
                X = self._half_step(ray, shards, "users", Y)
                Y = self._half_step(ray, shards, "items", X)
                self.iteration_seconds.append(time.perf_counter() - started)
                log.debug("RayALS iteration %d/%d in %.3fs", iteration + 1, self.iterations, self.iteration_seconds[-1])
        finally:
            for shard in shards:
                ray.kill(shard)
        self._set_factors(X, Y)

    @staticmethod
    def _half_step(ray, shards, side: str, fixed: np.ndarray) -> np.ndarray:
        fixed_ref = ray.put(fixed)
        gram_ref = ray.put(fixed.T @ fixed)
        parts = ray.get([shard.solve.remote(side, fixed_ref, gram_ref) for shard in shards])
        return np.vstack(parts)
