"""Diversity re-ranking: maximal marginal relevance with an artist cap.

MMR picks, one at a time, the candidate maximising
    λ · relevance − (1 − λ) · max cosine similarity to what is already picked,
so near-duplicates of an earlier pick sink. The similarity row of each pick is computed once
and folded into a running maximum, so the whole pass costs O(k · n) vector work.

The artist cap skips a candidate whose artist is already at the cap and keeps going down the
list, so the response stays k long whenever enough other artists exist.
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
    per_artist: dict = {}
    picked: list[int] = []
    while len(picked) < k and available.any():
        gain = lam * rel - (1.0 - lam) * max_sim
        gain[~available] = -np.inf
        best = int(np.argmax(gain))
        available[best] = False
        if artists is not None and artist_cap is not None:
            artist = artists[best]
            if per_artist.get(artist, 0) >= artist_cap:
                continue
            per_artist[artist] = per_artist.get(artist, 0) + 1
        picked.append(best)
        np.maximum(max_sim, emb @ emb[best], out=max_sim)
    return np.asarray(picked, dtype=np.int64)
