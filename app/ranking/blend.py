"""Hybrid blend of candidate sources.

Raw scores of different sources live on different scales (ALS dot products, cosines,
z-scores, play counts), so each source is rank-normalised to (0, 1] first: the best candidate
of a source gets 1, its worst 1/n. A track a source did not propose gets 0 from it, which is
exactly what "this source has no opinion" should contribute to a weighted sum.
"""

from __future__ import annotations

import numpy as np


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if n == 0:
        return scores
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n)
    return 1.0 - ranks / n


def blend_scores(
    candidates: dict[str, tuple[np.ndarray, np.ndarray]], weights: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, dict[int, list[str]]]:
    """Merge per-source (item indices, scores) into one ranking.

    Returns item indices and blended scores sorted best first, and for each item the sources
    that proposed it (the reason codes of the response). Sources without a weight are ignored.
    """
    totals: dict[int, float] = {}
    sources: dict[int, list[str]] = {}
    for source, (items, scores) in candidates.items():
        weight = weights.get(source, 0.0)
        if weight <= 0 or len(items) == 0:
            continue
        for item, score in zip(np.asarray(items).tolist(), (weight * rank_normalise(scores)).tolist()):
            totals[item] = totals.get(item, 0.0) + score
            sources.setdefault(item, []).append(source)
    if not totals:
        return np.empty(0, dtype=np.int64), np.empty(0), {}
    items = np.fromiter(totals.keys(), dtype=np.int64, count=len(totals))
    scores = np.fromiter(totals.values(), dtype=np.float64, count=len(totals))
    order = np.argsort(-scores, kind="stable")
    return items[order], scores[order], sources
