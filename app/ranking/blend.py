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
    if (scores[:-1] >= scores[1:]).all():
        # Already best first, as every retriever returns its list: the ranks are the positions
        # (what the stable sort below would give), without sorting.
        return 1.0 - np.arange(n) / n
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n)
    return 1.0 - ranks / n


class Reasons:
    """The reason codes of ranked items (which sources proposed each, what boosted it), one
    bitmask per item, bit j meaning `names[j]`. A blend ranks about a thousand candidates and
    hands them on to the reranker, which names the reasons of only the k it keeps: one int
    array travels and is sliced along with the candidates, instead of a thousand lists.

    `reasons[p]` is item p's list of names (a new list: the caller may extend it); slicing or
    indexing with an array gives the Reasons of those items."""

    __slots__ = ("names", "masks")

    def __init__(self, names: list[str], masks: np.ndarray):
        if len(names) > 62:
            raise ValueError("at most 62 reason codes fit a bitmask")
        self.names = list(names)
        self.masks = np.asarray(masks, dtype=np.int64)

    @classmethod
    def single(cls, name: str, n: int) -> "Reasons":
        """n items that all have the one reason `name`."""
        return cls([name], np.ones(n, dtype=np.int64))

    def flag(self, name: str, where: np.ndarray) -> "Reasons":
        """These reasons plus `name` for the items where `where` is true."""
        bit = np.int64(1 << len(self.names))
        return Reasons([*self.names, name], self.masks | np.where(where, bit, np.int64(0)))

    def __len__(self) -> int:
        return len(self.masks)

    def _named(self, mask: int) -> list[str]:
        return [name for bit, name in enumerate(self.names) if mask >> bit & 1]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._named(int(self.masks[key]))
        return Reasons(self.names, self.masks[key])

    def __iter__(self):
        named: dict[int, list[str]] = {}  # a list has few distinct masks: name each once
        for mask in self.masks.tolist():
            if mask not in named:
                named[mask] = self._named(mask)
            yield list(named[mask])

    def __getstate__(self):
        return self.names, self.masks

    def __setstate__(self, state) -> None:
        self.names, self.masks = state


def blend_scores(
    candidates: dict[str, tuple[np.ndarray, np.ndarray]], weights: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, Reasons]:
    """Merge per-source (item indices, scores) into one ranking.

    Returns item indices and blended scores sorted best first (ties in order of first
    proposal), and, in the same order, the sources that proposed each item (the reason codes
    of the response).
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
        return np.empty(0, dtype=np.int64), np.empty(0), Reasons([], np.empty(0, dtype=np.int64))
    items = np.concatenate(item_parts)
    bits = np.concatenate([np.full(len(part), 1 << j, dtype=np.int64) for j, part in enumerate(item_parts)])
    unique, inverse = np.unique(items, return_inverse=True)
    totals = np.bincount(inverse, weights=np.concatenate(score_parts), minlength=len(unique))
    first = np.full(len(unique), len(items), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(items)))
    masks = np.zeros(len(unique), dtype=np.int64)
    np.bitwise_or.at(masks, inverse, bits)
    order = np.lexsort((first, -totals))
    return unique[order], totals[order], Reasons(names, masks[order])
