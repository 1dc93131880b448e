"""Recency boost with a true half-life: a track `half_life_days` old gets half the boost of a
track released today, one twice that age a quarter, and so on."""

from __future__ import annotations

import numba
import numpy as np

MS_PER_DAY = 86_400_000


def recency_boost(release_ms: np.ndarray, now_ms: int, half_life_days: float) -> np.ndarray:
    """2^(-age / half-life) in (0, 1]; unknown release dates (NaN) and future dates get 0 and 1."""
    release = np.asarray(release_ms, dtype=np.float64)
    return _boosts(release.ravel(), float(now_ms), float(half_life_days)).reshape(release.shape)


@numba.njit(cache=True, nogil=True)
def boost_of(release_ms: float, now_ms: float, half_life_days: float) -> float:  # pragma: no cover - compiled
    """One track's boost; compiled, so the blend's kernel (app/ranking/blend.py) applies the
    very same formula as `recency_boost`."""
    if np.isnan(release_ms):
        return 0.0
    age_days = max((now_ms - release_ms) / MS_PER_DAY, 0.0)
    return np.exp2(-age_days / half_life_days)


@numba.njit(cache=True, nogil=True)
def _boosts(release: np.ndarray, now_ms: float, half_life_days: float) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty(len(release))
    for i in range(len(release)):
        out[i] = boost_of(release[i], now_ms, half_life_days)
    return out
