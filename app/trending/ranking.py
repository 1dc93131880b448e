"""From scored tracks to the published lists: smoothing across runs and caps.

Smoothing orders the list by an exponentially weighted score so a list refreshed every hour
does not reshuffle on noise; membership still needs this run's significance, so a trend that
has ended leaves at once and the false-trend budget holds per run. A track's smoothed score is

    s_now = d * s_prev + (1 - d) * score_now,   d = 0.5 ** (hours since previous run / half-life)

and the state (one row per list and track) is persisted with each run. Re-running at the same
`now` starts again from the state the previous run started from, so a retry changes nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

STATE_COLUMNS = ["list", "track_id", "smoothed", "as_of_ms", "prev_smoothed", "prev_as_of_ms"]
KEEP_BELOW = 0.05
"""Smoothed scores below this are dropped from the state: the trend has faded away."""


def empty_state() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object if c in ("list", "track_id") else np.float64) for c in STATE_COLUMNS})


def smooth(scored: pd.DataFrame, state: pd.DataFrame, list_name: str, now_ms: int, half_life_h: float) -> tuple[pd.Series, pd.DataFrame]:
    """Smoothed score per track of `scored` (indexed like it) and this list's new state rows.

    `scored` has track_id, score; only positive scores feed the smoothing (a track below its
    expectation contributes 0, so its old trend decays)."""
    old = state[state["list"] == list_name].set_index("track_id")
    if len(old) and (old["as_of_ms"] >= now_ms).all():
        # A retry of (or a run before) the last one: start from what that run started from.
        old = old[old["prev_as_of_ms"].notna()]
        old = pd.DataFrame({"smoothed": old["prev_smoothed"], "as_of_ms": old["prev_as_of_ms"]})
    current = pd.Series(np.maximum(scored["score"].to_numpy(dtype=np.float64), 0.0), index=scored["track_id"].to_numpy())
    current = current.groupby(level=0).max()
    tracks = current.index.union(old.index)
    now_score = current.reindex(tracks, fill_value=0.0)
    if half_life_h > 0 and len(old):
        hours = (now_ms - old["as_of_ms"].reindex(tracks).to_numpy(dtype=np.float64)) / 3_600_000
        decay = np.where(np.isnan(hours), 0.0, 0.5 ** (np.clip(hours, 0, None) / half_life_h))
        prev = old["smoothed"].reindex(tracks).fillna(0.0).to_numpy()
        smoothed = decay * prev + (1 - decay) * now_score.to_numpy()
    else:
        smoothed = now_score.to_numpy()
    smoothed = pd.Series(smoothed, index=tracks)
    keep = smoothed >= KEEP_BELOW
    rows = pd.DataFrame(
        {
            "list": list_name,
            "track_id": tracks[keep.to_numpy()],
            "smoothed": smoothed[keep].to_numpy(),
            "as_of_ms": float(now_ms),
            "prev_smoothed": old["smoothed"].reindex(tracks[keep.to_numpy()]).to_numpy(dtype=np.float64),
            "prev_as_of_ms": old["as_of_ms"].reindex(tracks[keep.to_numpy()]).to_numpy(dtype=np.float64),
        }
    )
    return smoothed.reindex(scored["track_id"].to_numpy()).to_numpy(), rows


def apply_caps(
    ranked: pd.DataFrame,
    k: int,
    max_per_artist: int | None = None,
    max_per_genre: int | None = None,
    category_caps: dict[str, int] | None = None,
) -> pd.DataFrame:
    """The first k rows of `ranked` (best first) that keep every artist, genre and category
    under its cap. Missing artist_id/genre/category columns or values are not capped (category
    falls back to `other`)."""
    counts: dict[tuple[str, object], int] = {}
    caps = category_caps or {}
    keep = []
    artist = ranked["artist_id"].to_numpy() if "artist_id" in ranked else [None] * len(ranked)
    genre = ranked["genre"].to_numpy() if "genre" in ranked else [None] * len(ranked)
    category = ranked["category"].to_numpy() if "category" in ranked else [None] * len(ranked)
    for i in range(len(ranked)):
        if len(keep) == k:
            break
        cat = category[i] if isinstance(category[i], str) and category[i] in caps else "other"
        checks = [("artist", artist[i], max_per_artist), ("genre", genre[i], max_per_genre)]
        if caps:
            checks.append(("category", cat, caps.get(cat, caps.get("other"))))
        live = [(kind, v, cap) for kind, v, cap in checks if cap is not None and isinstance(v, str)]
        if any(counts.get((kind, v), 0) >= cap for kind, v, cap in live):
            continue
        for kind, v, _ in live:
            counts[(kind, v)] = counts.get((kind, v), 0) + 1
        keep.append(i)
    return ranked.iloc[keep].reset_index(drop=True)
