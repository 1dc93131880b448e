"""Recency boost with a true half-life: a track `half_life_days` old gets half the boost of a
track released today, one twice that age a quarter, and so on."""

from __future__ import annotations

import numpy as np

MS_PER_DAY = 86_400_000


def recency_boost(release_ms: np.ndarray, now_ms: int, half_life_days: float) -> np.ndarray:
    """2^(-age / half-life) in (0, 1]; unknown release dates (NaN) and future dates get 0 and 1."""
    release = np.asarray(release_ms, dtype=np.float64)
    age_days = np.maximum((now_ms - release) / MS_PER_DAY, 0.0)
    boost = np.exp2(-age_days / half_life_days)
    return np.where(np.isnan(release), 0.0, boost)
