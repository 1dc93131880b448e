"""Implicit-feedback ALS (Hu, Koren and Volinsky 2008) with conjugate-gradient half-steps.

Confidence C = 1 + alpha * R, preference P = (R > 0). Each half-step fixes one side and
updates the other with a few CG steps warm-started from the previous factors, as implicit's
CG solver does, but vectorised over every row of a block with numpy/scipy instead of a loop
per user. `solve_block` is a pure function of one block so that a Ray job can run blocks in
parallel tasks with the fixed factors shared through the object store; `ImplicitALS.fit` runs
the same function serially over row blocks.

    model = ImplicitALS.from_settings(settings.cf).fit(user_items)
    ids, scores = model.recommend(user, user_items, k=10)
    vector = model.fold_in(item_ids=[3, 17, 17])   # a listener the model has not seen
"""

from __future__ import annotations

import logging
import time

import numpy as np
import scipy.sparse as sp

from app.config import CFSettings
from training.recommender import Recommender, cosine_to, check_user_items

log = logging.getLogger(__name__)

_CONVERGED = 1e-20
"""Squared residual below which a row stops moving; implicit uses the same threshold."""


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def solve_block(
    R_block: sp.csr_matrix,
    X_block: np.ndarray,
    Y: np.ndarray,
    YtY: np.ndarray,
    regularization: float,
    alpha: float,
    cg_steps: int,
) -> np.ndarray:
    """One ALS half-step for a block of rows: the new `X_block`, inputs left untouched.

    Solves (YᵀC_uY + λI) x_u = YᵀC_u P_u for every row u at once with `cg_steps` CG steps from
    x_u = X_block[u]. YᵀC_uY is never formed: A·x = (YᵀY + λI)x + Yᵀ(C_u − I)Y x, where the
    second term only touches the row's non-zeros (a gather of Y, row-wise dots, then a CSR @ Y
    scatter). Inputs are not mutated because in a Ray task they are read-only object-store views.

    `YtY` is Yᵀ Y of the full fixed side, computed once per half-step by the caller rather
    than once per block.
    """
    R_block = sp.csr_matrix(R_block, dtype=np.float32)
    n_rows, n_factors = X_block.shape
    if R_block.shape[0] != n_rows:
        raise ValueError(f"R_block has {R_block.shape[0]} rows but X_block has {n_rows}")
    if R_block.shape[1] != Y.shape[0]:
        raise ValueError(f"R_block has {R_block.shape[1]} columns but Y has {Y.shape[0]} rows")
    if Y.shape[1] != n_factors or YtY.shape != (n_factors, n_factors):
        raise ValueError(f"factor dimensions disagree: X {X_block.shape}, Y {Y.shape}, YtY {YtY.shape}")
    dtype = np.float32
    Y = np.asarray(Y, dtype=dtype)
    x = np.array(X_block, dtype=dtype, copy=True)
    if n_rows == 0:
        return x
    gram = np.asarray(YtY, dtype=dtype) + dtype(regularization) * np.eye(n_factors, dtype=dtype)

    values = R_block.data
    extra_confidence = dtype(alpha) * values  # C - 1 on the non-zeros; 0 elsewhere
    rows = np.repeat(np.arange(n_rows), np.diff(R_block.indptr))
    Y_nz = Y[R_block.indices]  # gathered once, reused by every CG step

    def scatter(weights: np.ndarray) -> np.ndarray:
        return sp.csr_matrix((weights, R_block.indices, R_block.indptr), shape=R_block.shape) @ Y

    def apply_A(v: np.ndarray) -> np.ndarray:
        return v @ gram + scatter(extra_confidence * _rowdot(Y_nz, v[rows]))

    b = scatter(np.where(values > 0, 1 + extra_confidence, 0).astype(dtype))
    r = b - apply_A(x)
    p = r.copy()
    rs_old = _rowdot(r, r)
    for _ in range(cg_steps):
        active = rs_old > _CONVERGED
        if not active.any():
            break
        Ap = apply_A(p)
        pAp = _rowdot(p, Ap)
        step = np.divide(rs_old, pAp, out=np.zeros_like(rs_old), where=active & (pAp > 0))
        x += step[:, None] * p
        r -= step[:, None] * Ap
        rs_new = _rowdot(r, r)
        beta = np.divide(rs_new, rs_old, out=np.zeros_like(rs_new), where=active)
        p = r + beta[:, None] * p
        rs_old = np.where(active, rs_new, 0)
    return x


def row_blocks(n_rows: int, block_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering n_rows: the unit of work of one (Ray) task."""
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
    block_size: int,
    YtY: np.ndarray | None = None,
) -> np.ndarray:
    """Serial half-step: `solve_block` over row blocks.

    `training.als_ray` runs this on each worker's shard of rows, passing the `YtY` it computed
    once for the whole fixed side.
    """
    YtY = Y.T @ Y if YtY is None else YtY
    out = np.empty_like(X)
    for start, stop in row_blocks(R.shape[0], block_size):
        out[start:stop] = solve_block(R[start:stop], X[start:stop], Y, YtY, regularization, alpha, cg_steps)
    return out


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
    """Matrix factorisation for implicit feedback; scores are dot products of factors."""

    def __init__(
        self,
        factors: int = 32,
        regularization: float = 5.0,
        alpha: float = 10.0,
        iterations: int = 12,
        cg_steps: int = 3,
        seed: int = 0,
        block_size: int = 4096,
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
            X = half_step(user_items, X, Y, self.regularization, self.alpha, self.cg_steps, self.block_size)
            Y = half_step(item_users, Y, X, self.regularization, self.alpha, self.cg_steps, self.block_size)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "ALS iteration %d/%d in %.3fs, loss %.5f",
                    iteration + 1,
                    self.iterations,
                    time.perf_counter() - started,
                    training_loss(user_items, X, Y, self.regularization, self.alpha),
                )
        self._set_factors(X, Y)

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
