"""Candidate retrieval over in-memory item matrices: vectorised top-k, no Python loop per item."""

from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k largest entries, best first; `exclude` indices never appear.

    argpartition keeps this O(n) in the catalogue size; only the k winners are sorted.
    """
    scores = np.array(scores, dtype=np.float64)  # a copy of our own: exclusions overwrite it
    if exclude is not None and len(exclude):
        scores[exclude] = -np.inf
    k = min(k, int(np.isfinite(scores).sum()))
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    negated = -scores  # both sorts below ascend
    idx = np.argpartition(negated, k - 1)[:k]
    idx = idx[np.argsort(negated[idx], kind="stable")]
    return idx, scores[idx]


def cf_candidates(user_vector: np.ndarray, item_factors: np.ndarray, n: int, exclude: np.ndarray | None = None):
    """Items with the highest predicted preference x_u · y_i."""
    return top_k(item_factors @ np.asarray(user_vector, dtype=item_factors.dtype), n, exclude)


def content_candidates(seed_items: np.ndarray, embeddings: np.ndarray, n: int, exclude: np.ndarray | None = None):
    """Nearest neighbours of the centroid of the user's recent plays (embeddings are unit-norm,
    so the dot product is the cosine similarity)."""
    if len(seed_items) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    centroid = embeddings[seed_items].mean(axis=0)
    norm = np.linalg.norm(centroid)
    if norm == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    return top_k(embeddings @ (centroid / norm), n, exclude)
