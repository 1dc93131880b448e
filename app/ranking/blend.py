"""Hybrid blend of candidate sources.

Raw scores of different sources live on different scales (ALS dot products, cosines,
z-scores, play counts), so each source is rank-normalised to (0, 1] first: the best candidate
of a source gets 1, its worst 1/n. A track a source did not propose gets 0 from it, which is
exactly what "this source has no opinion" should contribute to a weighted sum.
"""

from __future__ import annotations

import numba
import numpy as np

from app.ranking.recency import boost_of


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    return _rank_normalised(np.asarray(scores, dtype=np.float64))


@numba.njit(cache=True, nogil=True)
def _rank_normalised(scores: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    if _best_first(scores):  # as every retriever returns its list: item j's rank is j, no sort
        return 1.0 - np.arange(len(scores)) / len(scores)
    return _ranked_by_sort(scores)


@numba.njit(cache=True, nogil=True)
def _best_first(scores: np.ndarray) -> bool:  # pragma: no cover - compiled
    for j in range(len(scores) - 1):
        if not scores[j] >= scores[j + 1]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _ranked_by_sort(scores: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Normalised ranks by a stable sort, ties keeping their order."""
    n = len(scores)
    ranks = np.empty(n, dtype=np.int64)
    ranks[np.argsort(-scores, kind="mergesort")] = np.arange(n)
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
    candidates: dict[str, tuple[np.ndarray, np.ndarray]], weights: dict[str, float], n_items: int | None = None
) -> tuple[np.ndarray, np.ndarray, Reasons]:
    """Merge per-source (item indices, scores) into one ranking.

    Returns item indices and blended scores sorted best first (ties in order of first
    proposal), and, in the same order, the sources that proposed each item (the reason codes
    of the response). Sources without a weight are ignored. Items are catalog positions below
    `n_items` (default: the largest one + 1)."""
    return blend_ranked(candidates, weights, n_items)


def blend_ranked(
    candidates: dict[str, tuple[np.ndarray, np.ndarray]],
    weights: dict[str, float],
    n_items: int | None = None,
    *,
    release_ms: np.ndarray | None = None,
    now_ms: float = 0.0,
    half_life_days: float = 1.0,
    recency_weight: float = 0.0,
    recency_reason_min: float = 0.5,
    excluded: np.ndarray | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray, Reasons]:
    """`blend_scores`, then the recency boost and the exclusions, in one compiled pass.

    With `release_ms` (release times by catalog position) each item's score gains
    `recency_weight * recency_boost(...)` and the list is re-sorted by it (ties keeping the
    blend's order); items whose boost is at least `recency_reason_min` get the reason
    "recency_boost". `excluded` (a boolean mask over catalog positions) drops items, and at
    most `limit` are returned.

    Compiled because a live replica runs this with cold caches (deployments/ranking.py), where
    each of the ~60 numpy calls the same steps took cost several microseconds: the whole
    `blend_candidates` went from 0.27-0.36 to 0.19-0.22 ms per request, the same answers
    (tests/test_ranking.py holds the plain steps and compares).
    """
    names, item_parts, score_parts, source_weights = [], [], [], []
    for source, (items, scores) in candidates.items():
        weight = weights.get(source, 0.0)
        if weight <= 0 or len(items) == 0:
            continue
        names.append(source)
        item_parts.append(np.asarray(items, dtype=np.int64))
        score_parts.append(np.asarray(scores, dtype=np.float64))
        source_weights.append(float(weight))
    labels = names if release_ms is None else [*names, "recency_boost"]
    if not names:
        return np.empty(0, dtype=np.int64), np.empty(0), Reasons(labels, np.empty(0, dtype=np.int64))
    items = np.concatenate(item_parts)
    n_items = int(items.max()) + 1 if n_items is None else int(n_items)
    starts = np.zeros(len(names) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([len(p) for p in item_parts])
    merged, scores, masks = _blend(
        items, np.concatenate(score_parts), starts, np.asarray(source_weights), n_items,
        _NO_RELEASES if release_ms is None else np.asarray(release_ms, dtype=np.float64), float(now_ms),
        float(half_life_days), float(recency_weight) if release_ms is not None else 0.0, float(recency_reason_min),
        _NOTHING_EXCLUDED if excluded is None else np.asarray(excluded, dtype=np.bool_), -1 if limit is None else int(limit),
    )
    return merged, scores, Reasons(labels, masks)


_NO_RELEASES = np.empty(0)
_NO_RANKS = np.empty(0)
_NOTHING_EXCLUDED = np.zeros(0, dtype=np.bool_)


def compile_blend() -> None:
    """Compile (or load from numba's cache) the blend's kernels when a replica starts rather
    than on its first request."""
    blend_ranked({"a": (np.array([0, 1]), np.array([2.0, 1.0]))}, {"a": 1.0}, 2, release_ms=np.zeros(2), excluded=np.zeros(2, dtype=bool))
    rank_normalise(np.array([1.0, 2.0]))


@numba.njit(cache=True, nogil=True)
def _blend(
    items, scores, starts, weights, n_items, release_ms, now_ms, half_life_days, recency_weight, reason_min, excluded, limit
):  # pragma: no cover - compiled
    # Compiled code does not check indices: a position outside the catalogue would read or
    # write past an array instead of raising, so it is refused here.
    if len(excluded) and len(excluded) < n_items or recency_weight > 0 and len(release_ms) < n_items:
        raise ValueError("excluded and release_ms must cover every catalog position")
    for item in items:
        if item < 0 or item >= n_items:
            raise IndexError("candidate position outside the catalogue")
    # Sum each source's weighted rank into arrays indexed by catalog position, noting each
    # item's sources and the order in which items were first proposed.
    totals = np.zeros(n_items)
    masks = np.zeros(n_items, dtype=np.int64)
    seen = np.zeros(n_items, dtype=np.bool_)
    unique = np.empty(len(items), dtype=np.int64)
    n_unique = 0
    for s in range(len(weights)):
        a, b = starts[s], starts[s + 1]
        n = b - a
        # Best first, as every retriever returns its list, item j's rank is j: no sort.
        best_first = _best_first(scores[a:b])
        normalised = _NO_RANKS if best_first else _ranked_by_sort(scores[a:b])
        bit = np.int64(1) << s
        for j in range(n):
            item = items[a + j]
            totals[item] += weights[s] * ((1.0 - j / n) if best_first else normalised[j])
            masks[item] |= bit
            if not seen[item]:
                seen[item] = True
                unique[n_unique] = item
                n_unique += 1
    unique = unique[:n_unique]
    order = np.argsort(-totals[unique], kind="mergesort")
    unique = unique[order]
    ranked = totals[unique]
    boosted = np.zeros(n_unique, dtype=np.bool_)
    if recency_weight > 0:
        for j in range(n_unique):
            boost = boost_of(release_ms[unique[j]], now_ms, half_life_days)
            ranked[j] = ranked[j] + recency_weight * boost
            boosted[j] = boost >= reason_min
        order = np.argsort(-ranked, kind="mergesort")
        unique, ranked, boosted = unique[order], ranked[order], boosted[order]
    recency_bit = np.int64(1) << len(weights)
    out_items = np.empty(n_unique, dtype=np.int64)
    out_scores = np.empty(n_unique)
    out_masks = np.empty(n_unique, dtype=np.int64)
    m = 0
    for j in range(n_unique):
        if m == limit:
            break
        item = unique[j]
        if len(excluded) and excluded[item]:
            continue
        out_items[m] = item
        out_scores[m] = ranked[j]
        out_masks[m] = (masks[item] | recency_bit) if boosted[j] else masks[item]
        m += 1
    return out_items[:m], out_scores[:m], out_masks[:m]
