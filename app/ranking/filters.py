"""Hard filters applied before re-ranking: things a listener must never be shown."""

from __future__ import annotations

import numpy as np

MS_PER_DAY = 86_400_000


def allowed(
    track_ids: np.ndarray,
    artists: np.ndarray,
    explicit: np.ndarray,
    *,
    heard_at_ms: dict[str, int] | None = None,
    now_ms: int = 0,
    heard_within_days: float | None = None,
    always_exclude: set[str] = frozenset(),
    blocked_tracks: set[str] = frozenset(),
    blocked_artists: set[str] = frozenset(),
    allow_explicit: bool = True,
) -> np.ndarray:
    """Boolean mask over candidates.

    A track heard within `heard_within_days` (last play time in `heard_at_ms`) is dropped;
    `always_exclude` drops tracks regardless of when (e.g. everything already in the user's
    history when no timestamps are known); hidden/blocked tracks and artists and, for users
    who opted out, explicit tracks are dropped too.
    """
    mask = np.ones(len(track_ids), dtype=bool)
    heard_filter = bool(heard_at_ms) and heard_within_days is not None
    excluded = set(always_exclude) | set(blocked_tracks)
    # Track ids become Python strings only for a filter that looks them up, and once: in the
    # blend none does (it excludes by catalog position), and converting ~750 ids was a tenth
    # of its time.
    ids = np.asarray(track_ids, dtype=object) if heard_filter or excluded else None
    if heard_filter:
        cutoff = now_ms - heard_within_days * MS_PER_DAY
        mask &= np.array([heard_at_ms.get(t, -np.inf) < cutoff for t in ids], dtype=bool)
    # Set lookups: np.isin on object arrays sorts the strings, several times slower here.
    if excluded:
        mask &= np.fromiter((t not in excluded for t in ids), dtype=bool, count=len(mask))
    if blocked_artists:
        blocked = set(blocked_artists)
        mask &= np.fromiter((a not in blocked for a in np.asarray(artists, dtype=object)), dtype=bool, count=len(mask))
    if not allow_explicit:
        mask &= ~np.asarray(explicit, dtype=bool)
    return mask
