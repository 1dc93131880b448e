"""Implicit-feedback ALS (Hu, Koren and Volinsky 2008) with conjugate-gradient half-steps.

Confidence C = 1 + alpha * R, preference P = (R > 0). Each half-step fixes one side and
updates the other with a few CG steps warm-started from the previous factors, exactly as
implicit's `least_squares_cg` does, in a numba kernel that runs rows in parallel threads.
`half_step` is a pure function of a CSR block of rows, so a Ray job runs it on each worker's
shard with the fixed factors shared through the object store (`training.als_ray`), and
`ImplicitALS.fit` runs it on all rows in-process.

    model = ImplicitALS.from_settings(settings.cf).fit(user_items)
    ids, scores = model.recommend(user, user_items, k=10)
    vector = model.fold_in(item_ids=[3, 17, 17])   # a listener the model has not seen
"""

from __future__ import annotations

import logging
import time

import numba
import numpy as np
import scipy.sparse as sp

from app.config import CFSettings
from training.recommender import Recommender, cosine_to, check_user_items

log = logging.getLogger(__name__)

_CONVERGED = 1e-20
"""Squared residual below which a row stops moving; implicit uses the same threshold."""
_ROWS_PER_CHUNK = 64
"""Rows a kernel thread takes at a time: small enough to balance skewed rows across threads,
large enough that handing out chunks costs nothing next to solving them."""


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _cg_rows(indptr, indices, data, X, Y, gram, alpha, cg_steps, out):  # pragma: no cover (compiled)
    """Hu-Koren-Volinsky CG for every row of a CSR block, one row per thread at a time.

    Row u solves (YᵀC_uY + λI) x = YᵀC_u p_u from x = X[u]; `gram` is YᵀY + λI, so A·v is
    gram·v plus Σ_i (c_ui − 1)(y_i·v) y_i over the row's non-zeros only (implicit's
    `least_squares_cg`). C − 1 = alpha·value; the preference is value > 0, so an explicit zero
    adds nothing. Writes `out[u]`; reads nothing it writes, so rows are independent.
    """
    n_rows, k = X.shape
    for u in numba.prange(n_rows):
        x = X[u].copy()
        r = np.empty(k, dtype=np.float32)
        Ap = np.empty(k, dtype=np.float32)
        start, stop = indptr[u], indptr[u + 1]
        # r = b − A·x
        r[:] = 0
        for a in range(k):
            xa = x[a]
            for b in range(k):
                r[b] -= gram[a, b] * xa
        for j in range(start, stop):
            y = Y[indices[j]]
            confidence = alpha * data[j]
            dot = np.float32(0)
            for a in range(k):
                dot += y[a] * x[a]
            weight = -confidence * dot
            if data[j] > 0:
                weight += 1 + confidence
            for a in range(k):
                r[a] += weight * y[a]
        p = r.copy()
        rs_old = np.float32(0)
        for a in range(k):
            rs_old += r[a] * r[a]
        for _ in range(cg_steps):
            if rs_old <= _CONVERGED:
                break
            # Ap = A·p without forming YᵀC_uY
            Ap[:] = 0
            for a in range(k):
                pa = p[a]
                for b in range(k):
                    Ap[b] += gram[a, b] * pa
            for j in range(start, stop):
                y = Y[indices[j]]
                dot = np.float32(0)
                for a in range(k):
                    dot += y[a] * p[a]
                weight = alpha * data[j] * dot
                for a in range(k):
                    Ap[a] += weight * y[a]
            pAp = np.float32(0)
            for a in range(k):
                pAp += p[a] * Ap[a]
            if pAp <= 0:  # only with regularization 0 and a degenerate row: nothing to gain
                break
            step = rs_old / pAp
            rs_new = np.float32(0)
            for a in range(k):
                x[a] += step * p[a]
                r[a] -= step * Ap[a]
                rs_new += r[a] * r[a]
            beta = rs_new / rs_old
            for a in range(k):
                p[a] = r[a] + beta * p[a]
            rs_old = rs_new
        out[u] = x


def kernel_threads(num_threads: int) -> int:
    """Threads the CG kernel will use: `num_threads`, or every core numba sees when it is 0."""
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0, got {num_threads}")
    available = numba.config.NUMBA_NUM_THREADS
    return available if num_threads == 0 else min(num_threads, available)


def row_blocks(n_rows: int, block_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering n_rows: the rows of one kernel call."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return [(start, min(start + block_size, n_rows)) for start in range(0, n_rows, block_size)]


def half_step(
    R: sp.csr_matrix,
    X: np.ndarray,
    Y: np.ndarray,
    regularization: float,
    alpha: float,
    cg_steps: int,
    block_size: int = 4096,
    YtY: np.ndarray | None = None,
    num_threads: int = 0,
) -> np.ndarray:
    """One ALS half-step: the new X for every row of R, inputs left untouched.

    Solves (YᵀC_uY + λI) x_u = YᵀC_u P_u for every row u with `cg_steps` CG steps from
    x_u = X[u], in a compiled kernel that runs rows in parallel on `num_threads` threads
    (0: all cores), `block_size` rows per call. Each row is solved start to finish by one
    thread, so the result does not depend on the thread count, the blocks or how a Ray job
    shards the rows. Inputs are not mutated because in a Ray actor they are read-only
    object-store views.

    `YtY` is Yᵀ Y of the full fixed side: `training.als_ray` computes it once per half-step
    for all its workers. The first call in a process compiles the kernel (or loads it from
    numba's on-disk cache); `warm_up` does that ahead of timed work.
    """
    R = sp.csr_matrix(R, dtype=np.float32)
    n_rows, n_factors = X.shape
    if R.shape[0] != n_rows:
        raise ValueError(f"R has {R.shape[0]} rows but X has {n_rows}")
    if R.shape[1] != Y.shape[0]:
        raise ValueError(f"R has {R.shape[1]} columns but Y has {Y.shape[0]} rows")
    YtY = Y.T @ Y if YtY is None else YtY
    if Y.shape[1] != n_factors or YtY.shape != (n_factors, n_factors):
        raise ValueError(f"factor dimensions disagree: X {X.shape}, Y {Y.shape}, YtY {YtY.shape}")
    dtype = np.float32
    X = np.ascontiguousarray(X, dtype=dtype)
    Y = np.ascontiguousarray(Y, dtype=dtype)
    gram = np.asarray(YtY, dtype=dtype) + dtype(regularization) * np.eye(n_factors, dtype=dtype)
    out = np.empty_like(X)
    previous_threads = numba.get_num_threads()  # a per-thread setting: leave it as found
    numba.set_num_threads(kernel_threads(num_threads))
    try:
        # Rows differ widely in cost (a hit track has thousands of listeners), so threads take
        # small chunks of rows as they free up rather than one fixed half each.
        with numba.parallel_chunksize(_ROWS_PER_CHUNK):
            for start, stop in row_blocks(n_rows, block_size):
                # A block is a window of indptr over the whole indices/data: no copy of the rows.
                _cg_rows(R.indptr[start:stop + 1], R.indices, R.data, X[start:stop], Y, gram,
                         dtype(alpha), int(cg_steps), out[start:stop])
    finally:
        numba.set_num_threads(previous_threads)
    return out


def warm_up() -> None:
    """Compile the CG kernel (or load it from numba's cache) on a tiny problem.

    A process calls this before timed work so the one-off compile is not counted as training
    time, just as a Cython library compiles at install, not at fit.
    """
    R = sp.csr_matrix(np.eye(2, dtype=np.float32))
    X = np.zeros((2, 2), dtype=np.float32)
    half_step(R, X, X, 1.0, 1.0, 1, num_threads=1)


def training_loss(R: sp.csr_matrix, X: np.ndarray, Y: np.ndarray, regularization: float, alpha: float) -> float:
    """Weighted squared error plus L2 penalty, divided by the total confidence.

    Same normalisation as implicit's `calculate_loss`, so numbers are comparable across
    libraries. The dense part Σ(xᵤ·yᵢ)² is trace(XᵀX YᵀY), so no users x items matrix is built.
    """
    R = sp.csr_matrix(R, dtype=np.float32)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    rows = np.repeat(np.arange(R.shape[0]), np.diff(R.indptr))
    pred = _rowdot(X64[rows], Y64[R.indices])
    confidence = 1 + alpha * R.data.astype(np.float64)
    preference = (R.data > 0).astype(np.float64)
    dense_part = float(np.sum((X64.T @ X64) * (Y64.T @ Y64)))
    sparse_part = float(np.sum(confidence * (preference - pred) ** 2 - pred**2))
    penalty = regularization * float(np.sum(X64**2) + np.sum(Y64**2))
    total_confidence = R.shape[0] * R.shape[1] + alpha * float(R.data.sum())
    return (dense_part + sparse_part + penalty) / total_confidence


class ImplicitALS(Recommender):
    """Matrix factorisation for implicit feedback; scores are dot products of factors.

    `num_threads` is the kernel's thread count during `fit` (0: every core, like implicit's).
    """

    def __init__(
        self,
        factors: int = 32,
        regularization: float = 5.0,
        alpha: float = 10.0,
        iterations: int = 12,
        cg_steps: int = 3,
        seed: int = 0,
        block_size: int = 4096,
        num_threads: int = 0,
    ) -> None:
        counts = {"factors": factors, "iterations": iterations, "cg_steps": cg_steps, "block_size": block_size}
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.factors = int(factors)
        self.regularization = float(regularization)
        self.alpha = float(alpha)
        self.iterations = int(iterations)
        self.cg_steps = int(cg_steps)
        self.seed = int(seed)
        self.block_size = int(block_size)
        kernel_threads(int(num_threads))  # validates
        self.num_threads = int(num_threads)
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None
        self._YtY: np.ndarray | None = None
        self._item_norms: np.ndarray | None = None

    @staticmethod
    def params_from(settings: CFSettings) -> dict:
        """The model's hyperparameters as `ray_config.yaml` sets them."""
        return {
            "factors": settings.factors,
            "regularization": settings.regularization,
            "alpha": settings.alpha,
            "iterations": settings.iterations,
            "cg_steps": settings.cg_steps,
            "seed": settings.seed,
        }

    @classmethod
    def from_settings(cls, settings: CFSettings, block_size: int = 4096) -> "ImplicitALS":
        return cls(**cls.params_from(settings), block_size=block_size)

    def init_factors(self, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
        """Small random normals (x0.01, as implicit scales its start) from the seed alone.

        Public so that a distributed fit starts from exactly the factors a local fit would.
        """
        rng = np.random.default_rng(self.seed)
        users = (rng.standard_normal((n_users, self.factors)) * 0.01).astype(np.float32)
        items = (rng.standard_normal((n_items, self.factors)) * 0.01).astype(np.float32)
        return users, items

    def _fit(self, user_items: sp.csr_matrix) -> None:
        item_users = user_items.T.tocsr()
        X, Y = self.init_factors(*user_items.shape)
        for iteration in range(self.iterations):
            started = time.perf_counter()
            X = self._half_step(user_items, X, Y)
            Y = self._half_step(item_users, Y, X)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "ALS iteration %d/%d in %.3fs, loss %.5f",
                    iteration + 1,
                    self.iterations,
                    time.perf_counter() - started,
                    training_loss(user_items, X, Y, self.regularization, self.alpha),
                )
        self._set_factors(X, Y)

    def _half_step(self, R: sp.csr_matrix, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return half_step(R, X, Y, self.regularization, self.alpha, self.cg_steps, self.block_size,
                         num_threads=self.num_threads)

    @classmethod
    def from_factors(cls, user_factors: np.ndarray, item_factors: np.ndarray, **params) -> "ImplicitALS":
        """A fitted model from factors computed elsewhere (a Ray job, or a saved artifact).

        `params` are the other constructor arguments (regularization and alpha matter for
        `fold_in`); `factors` is taken from the arrays.
        """
        if np.ndim(user_factors) != 2 or np.ndim(item_factors) != 2:
            raise ValueError("user_factors and item_factors must be 2-D")
        n_factors = np.shape(user_factors)[1]
        if np.shape(item_factors)[1] != n_factors or params.pop("factors", n_factors) != n_factors:
            raise ValueError(
                f"factor dimensions disagree: users {n_factors}, items {np.shape(item_factors)[1]}"
            )
        model = cls(factors=n_factors, **params)
        model.n_users, model.n_items = np.shape(user_factors)[0], np.shape(item_factors)[0]
        model._set_factors(user_factors, item_factors)
        return model

    def _set_factors(self, X: np.ndarray, Y: np.ndarray) -> None:
        self.user_factors = np.ascontiguousarray(X, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(Y, dtype=np.float32)
        if not (np.all(np.isfinite(self.user_factors)) and np.all(np.isfinite(self.item_factors))):
            raise ValueError("ALS produced non-finite factors; lower alpha or raise regularization")
        self._YtY = self.item_factors.T.astype(np.float64) @ self.item_factors.astype(np.float64)
        self._item_norms = np.linalg.norm(self.item_factors, axis=1)

    def loss(self, user_items: sp.csr_matrix) -> float:
        """Training objective on `user_items` (implicit's normalisation)."""
        self._check_fitted()
        csr = check_user_items(user_items, (self.n_users, self.n_items))
        return training_loss(csr, self.user_factors, self.item_factors, self.regularization, self.alpha)

    def _score(self, users: np.ndarray, items: np.ndarray | None, user_rows: sp.csr_matrix) -> np.ndarray:
        Y = self.item_factors if items is None else self.item_factors[items]
        return self.user_factors[users] @ Y.T

    def _similar_scores(self, item: int) -> np.ndarray:
        return cosine_to(self.item_factors, self._item_norms, item)

    def _fold_in(self, items: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """One exact least-squares solve of the confidence-weighted objective, item factors fixed.

        That is the user half-step solved to convergence, so a new listener gets CF scores now;
        score items with `item_factors @ vector`.
        """
        Y = self.item_factors[items].astype(np.float64)
        c_minus_1 = self.alpha * counts
        A = self._YtY + self.regularization * np.eye(self.factors) + (Y * c_minus_1[:, None]).T @ Y
        b = Y.T @ np.where(counts > 0, 1 + c_minus_1, 0.0)
        try:
            return np.linalg.solve(A, b).astype(np.float32)
        except np.linalg.LinAlgError:
            # Only reachable with regularization 0 and rank-deficient item factors.
            return np.linalg.lstsq(A, b, rcond=None)[0].astype(np.float32)

    def _score_vector(self, vector: np.ndarray, items: np.ndarray | None) -> np.ndarray:
        Y = self.item_factors if items is None else self.item_factors[items]
        return Y @ vector
