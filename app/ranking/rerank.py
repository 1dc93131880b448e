"""Diversity re-ranking: maximal marginal relevance with an artist cap.

MMR picks, one at a time, the candidate maximising
    λ · relevance − (1 − λ) · max cosine similarity to what is already picked,
so near-duplicates of an earlier pick sink. The similarity row of each pick is computed once
and folded into a running maximum, so the whole pass costs O(k · n) vector work.

Caps (at most `artist_cap` tracks per artist, at most `genre_cap` per genre: the genre
balance) take a group's other candidates out of play as soon as the group is full, so the
response stays k long whenever enough other candidates exist, rather than shortening it, and
no pass is spent on a candidate that could no longer be taken (a request used to spend 18
passes skipping capped candidates for its 20 picks). Groups compare fastest as integer codes
(ModelBundle.artist_codes); any labels work.
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
    caps = [(np.asarray(g), c, {}) for g, c in ((artists, artist_cap), (genres, genre_cap)) if g is not None and c is not None]
    if n == 0 or k <= 0 or any(c < 1 for _, c, _ in caps):
        return np.empty(0, dtype=np.int64)
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.ones(n)
    relevance_term = lam * rel
    emb = np.asarray(embeddings, dtype=np.float64)
    max_sim = np.zeros(n)
    out_of_play = np.zeros(n)  # -inf once a candidate is picked or its group is full
    picked: list[int] = []
    while len(picked) < k:
        gain = relevance_term - (1.0 - lam) * max_sim
        gain += out_of_play
        best = int(gain.argmax())
        if gain[best] == -np.inf:  # nothing left
            break
        picked.append(best)
        out_of_play[best] = -np.inf
        for groups, cap, counts in caps:
            group = groups[best]
            counts[group] = counts.get(group, 0) + 1
            if counts[group] >= cap:
                out_of_play[groups == group] = -np.inf
        np.maximum(max_sim, emb @ emb[best], out=max_sim)
    return np.asarray(picked, dtype=np.int64)
