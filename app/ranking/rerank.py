"""Diversity re-ranking: maximal marginal relevance with an artist cap.

MMR picks, one at a time, the candidate maximising
    λ · relevance − (1 − λ) · max cosine similarity to what is already picked,
so near-duplicates of an earlier pick sink. The similarity row of each pick is computed once
and folded into a running maximum, so the whole pass costs O(k · n) vector work.

Caps (at most `artist_cap` tracks per artist, at most `genre_cap` per genre: the genre
balance) skip a candidate whose group is full and keep going down the list, so the response
stays k long whenever enough other candidates exist, rather than shortening it. A skip
changes no similarity, so the next best comes from the same gains without recomputing them.
"""

from __future__ import annotations

import numpy as np


def mmr_rerank(
    relevance: np.ndarray,
    embeddings: np.ndarray,
    k: int,
    lam: float,
    artists: np.ndarray | None = None,
    artist_cap: int | None = None,
    genres: np.ndarray | None = None,
    genre_cap: int | None = None,
) -> np.ndarray:
    """Positions (into `relevance`) of the re-ranked top k."""
    n = len(relevance)
    if n == 0 or k <= 0:
        return np.empty(0, dtype=np.int64)
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.ones(n)
    emb = np.asarray(embeddings, dtype=np.float64)
    max_sim = np.zeros(n)
    available = np.ones(n, dtype=bool)
    caps = [(g, c, {}) for g, c in ((artists, artist_cap), (genres, genre_cap)) if g is not None and c is not None]
    picked: list[int] = []
    gain = None
    while len(picked) < k:
        if gain is None:  # the gains change only when a pick changes max_sim
            gain = lam * rel - (1.0 - lam) * max_sim
            gain[~available] = -np.inf
        best = int(np.argmax(gain))
        if gain[best] == -np.inf:  # nothing left
            break
        available[best] = False
        gain[best] = -np.inf
        if any(counts.get(groups[best], 0) >= cap for groups, cap, counts in caps):
            continue  # capped: the next best under the same gains
        for groups, _, counts in caps:
            counts[groups[best]] = counts.get(groups[best], 0) + 1
        picked.append(best)
        np.maximum(max_sim, emb @ emb[best], out=max_sim)
        gain = None
    return np.asarray(picked, dtype=np.int64)
