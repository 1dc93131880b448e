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


class SourceSets:
    """Which sources proposed each blended item (the reason codes), kept as one bitmask per
    item: the lists are only built for the few hundred items that survive to the response."""

    def __init__(self, names: list[str], items: np.ndarray, masks: np.ndarray):
        self.names = names
        self._items = items  # sorted unique item indices
        self._masks = masks
        self._lists: dict[int, list[str]] = {}

    def _list(self, mask: int) -> list[str]:
        if mask not in self._lists:
            self._lists[mask] = [name for bit, name in enumerate(self.names) if mask >> bit & 1]
        return self._lists[mask]

    def __getitem__(self, item: int) -> list[str]:
        return list(self.lists(np.asarray([item]))[0])

    def lists(self, items: np.ndarray) -> list[list[str]]:
        """Source names per item, in source order; items of the same sources share one list
        (copy before changing it)."""
        if len(items) == 0:
            return []
        pos = np.searchsorted(self._items, items)
        if not np.array_equal(self._items[np.minimum(pos, len(self._items) - 1)], items):
            raise KeyError("an item no source proposed")
        return [self._list(m) for m in self._masks[pos].tolist()]


def blend_scores(
    candidates: dict[str, tuple[np.ndarray, np.ndarray]], weights: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, SourceSets]:
    """Merge per-source (item indices, scores) into one ranking.

    Returns item indices and blended scores sorted best first (ties in order of first
    proposal), and the sources that proposed each item (the reason codes of the response).
    Sources without a weight are ignored. Vectorised: a request blends thousands of candidates.
    """
    names, item_parts, score_parts = [], [], []
    for source, (items, scores) in candidates.items():
        weight = weights.get(source, 0.0)
        if weight <= 0 or len(items) == 0:
            continue
        names.append(source)
        item_parts.append(np.asarray(items, dtype=np.int64))
        score_parts.append(weight * rank_normalise(scores))
    if not names:
        return np.empty(0, dtype=np.int64), np.empty(0), SourceSets([], np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    items = np.concatenate(item_parts)
    bits = np.concatenate([np.full(len(part), 1 << j, dtype=np.int64) for j, part in enumerate(item_parts)])
    unique, inverse = np.unique(items, return_inverse=True)
    totals = np.bincount(inverse, weights=np.concatenate(score_parts), minlength=len(unique))
    first = np.full(len(unique), len(items), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(items)))
    masks = np.zeros(len(unique), dtype=np.int64)
    np.bitwise_or.at(masks, inverse, bits)
    order = np.lexsort((first, -totals))
    return unique[order], totals[order], SourceSets(names, unique, masks)
