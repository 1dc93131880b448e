"""Trending tracks: tracks played more in the recent window than their history predicts.

Model (Gamma-Poisson, empirical Bayes). A track's weighted plays per hour are Poisson with
rate λ. The prior on λ is a Gamma whose mean is the catalogue's mean hourly rate μ, worth
`prior_plays` pseudo-plays (that is, prior_plays / μ pseudo-hours). After `b` weighted plays
over the `T` hours the track was observed in the baseline, the posterior mean rate is

    rate = (b + prior_plays) / (T + prior_plays / μ)

T is the time from the track's release (`tracks.release_date` when given, else its first event
of any type) to the start of the recent window, capped at the baseline length: a track
released yesterday has not had a week to be played, and
reading its empty week as "nobody wants this" would make every new track look like a
sensation. With T = 0 the rate is the prior mean, so a brand-new track is expected to do what
an average track does and trends once it clearly beats that. With a long history the prior is
a rounding error and the track is judged against itself. Over the recent window of W hours:

    expected = W * rate
    score = (observed - expected) / sqrt(expected)          Poisson z-score
    velocity = observed / W - rate                          extra plays per hour
    confidence = 1 - P(X >= observed | Poisson(expected))

Only tracks with score > 0 and at least `min_plays` weighted plays in the window are kept.

    top = trending_scores(events, now=pd.Timestamp.now(tz="UTC"), settings=settings.trending)
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.stats import poisson

from app.config import TrendingSettings

log = logging.getLogger(__name__)

COLUMNS = ["track_id", "score", "velocity", "observed", "expected", "confidence"]

HOUR = pd.Timedelta(hours=1)


def trending_scores(
    events: pd.DataFrame,
    now: pd.Timestamp,
    settings: TrendingSettings,
    tracks: pd.DataFrame | None = None,
    prior_plays: float = 1.0,
) -> pd.DataFrame:
    """Top `settings.top_k` trending tracks at `now`, best first (columns: COLUMNS).

    `events` needs track_id, event_type and timestamp. Event types missing from
    `settings.event_weights` (or weighted <= 0) add no plays but still show that a track
    existed. Events at or after `now` are ignored. `tracks` (with a track_id column), when
    given, adds unplayed catalogue tracks to the denominator of μ, so μ is the mean over the
    catalogue rather than over tracks that happened to be played; its optional release_date
    column replaces the first event as the start of a track's history. First events are a
    late estimate of a release for rarely played tracks, which errs toward not trending.
    """
    missing = [c for c in ("track_id", "event_type", "timestamp") if c not in events.columns]
    if missing:
        raise ValueError(f"events is missing columns {missing}")
    if tracks is not None and "track_id" not in tracks.columns:
        raise ValueError("tracks is missing column 'track_id'")
    if prior_plays <= 0:
        raise ValueError(f"prior_plays must be > 0, got {prior_plays}")

    now = pd.Timestamp(now)
    now = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
    window_hours, baseline_hours = settings.window_hours, settings.baseline_hours
    window_start = now - window_hours * HOUR
    baseline_start = window_start - baseline_hours * HOUR

    timestamps = pd.to_datetime(events["timestamp"], utc=True)
    weights = events["event_type"].map(settings.event_weights).fillna(0.0).astype(np.float64)
    past = (timestamps < now).to_numpy()
    frame = pd.DataFrame(
        {
            "track_id": events["track_id"].to_numpy()[past],
            "timestamp": timestamps.to_numpy()[past],
            "recent_weight": np.where((timestamps >= window_start) & (weights > 0), weights, 0.0)[past],
            "baseline_weight": np.where(
                (timestamps >= baseline_start) & (timestamps < window_start) & (weights > 0), weights, 0.0
            )[past],
        }
    )
    if frame.empty or frame["recent_weight"].sum() == 0:
        return _empty()
    per_track = frame.groupby("track_id").agg(
        observed=("recent_weight", "sum"), baseline=("baseline_weight", "sum"), first_seen=("timestamp", "min")
    )
    available_since = per_track["first_seen"]
    n_tracks = len(per_track)
    if tracks is not None:
        n_tracks = len(pd.Index(tracks["track_id"]).union(per_track.index))
        if "release_date" in tracks.columns:
            released = pd.Series(
                pd.to_datetime(tracks["release_date"], utc=True).to_numpy(), index=tracks["track_id"].to_numpy()
            )
            released = released[~released.index.duplicated()].reindex(per_track.index)
            available_since = released.where(released.notna(), available_since)
    exposure = ((window_start - available_since) / HOUR).clip(lower=0.0, upper=baseline_hours)

    # One pseudo-play spread over the catalogue keeps μ > 0 when the baseline is empty
    # (a fresh deployment), so expected never reaches 0 and the z-score stays finite.
    catalogue_rate = (per_track["baseline"].sum() + 1.0) / (n_tracks * baseline_hours)
    rate = (per_track["baseline"] + prior_plays) / (exposure + prior_plays / catalogue_rate)
    observed = per_track["observed"]
    expected = window_hours * rate
    # Weighted counts can be fractional: the p-value asks for at least ceil(observed) events.
    p_value = poisson.sf(np.ceil(observed.to_numpy()) - 1, expected.to_numpy())

    result = pd.DataFrame(
        {
            "track_id": per_track.index.to_numpy(),
            "score": ((observed - expected) / np.sqrt(expected)).to_numpy(),
            "velocity": (observed / window_hours - rate).to_numpy(),
            "observed": observed.to_numpy(),
            "expected": expected.to_numpy(),
            "confidence": 1.0 - p_value,
        }
    )
    result = result[(result["score"] > 0) & (result["observed"] >= settings.min_plays)]
    result = result.sort_values(["score", "observed"], ascending=[False, False], kind="stable").head(settings.top_k)
    log.debug(
        "trending at %s: %d of %d tracks qualify (catalogue rate %.4f/h)", now, len(result), n_tracks, catalogue_rate
    )
    return result.reset_index(drop=True)


def _empty() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in COLUMNS})
    return frame.astype({"track_id": object})
