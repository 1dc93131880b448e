"""Trending tracks: tracks played significantly more in the recent window than their history
(or, for a new track, the catalogue) predicts.

Model (Gamma-Poisson, empirical Bayes, with overdispersion). Weighted plays come in hourly
buckets counted back from `now` (app/trending/aggregate.py). A track's plays per hour are
Poisson with rate λ; the prior on λ is a Gamma whose mean is the catalogue's mean hourly rate μ,
worth `prior_plays` pseudo-plays. After `b` weighted baseline plays over the `T` hours the
track was available during the baseline, λ's posterior is Gamma(prior_plays + b,
prior_plays/μ + T), and the count in the recent window of W hours follows the posterior
predictive, a negative binomial. That predictive carries the uncertainty of the baseline
itself: 2 plays last week do not prove a rate of 2 a week, so 8 plays today are far less
surprising than a plain Poisson z-score says (measured: null worlds had Poisson z up to 13).

Real plays also come in clumps (one listener replays a track, likes weigh 2), so counts vary
more than Poisson. The dispersion φ is estimated from the data: the Pearson statistic of each
established track's baseline split into window-sized blocks, pooled over the catalogue. Counts
are divided by φ ("effective plays") before the negative binomial is applied.

T is the time since the track's release (`release_date`, else its first event of any type)
within the baseline, so a track released yesterday is not judged by an empty week it never
had: with T = 0 the expectation is the catalogue mean and a brand-new track trends once it
clearly beats an average track. With a long history the prior is a rounding error.

A track trends when (i) its one-sided p-value is below `false_trends_per_run / n` (Bonferroni
over the n tracks that clear the floor, so at most that many false trends per run are expected),
(ii) it has at least `min_plays` weighted plays in the window, (iii) it beats its expectation.

    score      = (observed - expected) / predictive sd
    velocity   = (observed - expected) / W        extra weighted plays per hour
    confidence = 1 - p_value

    hourly = hourly_frame(combine([HourlyAggregator(...)(events)]))
    top = trending_scores(events, now=pd.Timestamp.now(tz="UTC"), settings=settings.trending)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import nbinom

from app.config import TrendingSettings
from app.trending.aggregate import HOUR_MS, HOURLY, HourlyAggregator, combine

log = logging.getLogger(__name__)

COLUMNS = ["track_id", "score", "velocity", "observed", "expected", "confidence", "p_value"]
WEEK_HOURS = 7 * 24


@dataclass(frozen=True)
class Baseline:
    """Which buckets are the recent window and which the baseline, in buckets before `now`."""

    window: int
    """Buckets in the recent window (buckets 0..window-1)."""
    buckets: np.ndarray
    """Baseline bucket indices, sorted."""
    blocks: list[np.ndarray]
    """The baseline cut into window-sized blocks, for the dispersion estimate."""
    bucket_hours: int
    """Hours per bucket (1 for hourly counts, W for per-locale window blocks)."""

    @property
    def horizon(self) -> int:
        """First bucket past the baseline: everything older only says a track existed."""
        return int(self.buckets.max()) + 1 if len(self.buckets) else self.window

    @property
    def hours(self) -> float:
        return float(len(self.buckets) * self.bucket_hours)


def baseline_for(settings: TrendingSettings, bucket_hours: int = 1) -> Baseline:
    """Recent mode: the `baseline_hours` just before the window. Day-of-week mode: the same
    hours of the day and week as the window, `baseline_weeks` weeks back, so a Friday evening
    is compared with Friday evenings (falls back to recent mode when window blocks do not
    line up with weeks)."""
    w = settings.window_hours
    if bucket_hours not in (1, w):
        raise ValueError(f"bucket_hours must be 1 or window_hours ({w}), got {bucket_hours}")
    per = w // bucket_hours  # buckets per window
    if settings.baseline == "day_of_week" and (bucket_hours == 1 or WEEK_HOURS % w == 0):
        week = WEEK_HOURS // bucket_hours
        blocks = [np.arange(k * week, k * week + per) for k in range(1, settings.baseline_weeks + 1)]
    else:
        n = settings.baseline_hours // bucket_hours
        start = per
        blocks = [np.arange(start + j * per, start + (j + 1) * per) for j in range(n // per)]
        if bucket_hours == 1 and n % per:  # the baseline's remainder counts, it just makes no block
            blocks.append(np.arange(start + (n // per) * per, start + n))
    buckets = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
    full_blocks = [b for b in blocks if len(b) == per]
    return Baseline(window=per, buckets=buckets, blocks=full_blocks, bucket_hours=bucket_hours)


def hourly_frame(combined) -> pd.DataFrame:
    """The HOURLY rows of a combined aggregate as pandas (track_id, bucket, weight, first_ms)."""
    import pyarrow.compute as pc

    rows = combined.filter(pc.equal(combined["kind"], HOURLY))
    return rows.select(["track_id", "bucket", "weight", "events", "first_ms"]).to_pandas()


def window_counts(buckets: pd.DataFrame, base: Baseline) -> tuple[pd.Series, pd.Series, pd.DataFrame]:
    """Per track: weighted plays in the window, in the baseline, and per baseline block."""
    frame = buckets[["track_id", "bucket", "weight"]]
    bucket = frame["bucket"].to_numpy()
    block_of = np.full(base.horizon + 1, -2, dtype=np.int64)  # -2: outside every range
    block_of[: base.window] = -1
    for j, block in enumerate(base.blocks):
        block_of[block] = j
    in_range = bucket <= base.horizon
    label = np.full(len(frame), -2, dtype=np.int64)
    label[in_range] = block_of[bucket[in_range]]
    is_base = np.zeros(len(frame), dtype=bool)
    is_base[in_range] = np.isin(bucket[in_range], base.buckets)
    tracks = pd.Index(frame["track_id"].unique())
    weight = frame["weight"].to_numpy()
    observed = frame.loc[label == -1].groupby("track_id")["weight"].sum().reindex(tracks, fill_value=0.0)
    baseline = frame.loc[is_base].groupby("track_id")["weight"].sum().reindex(tracks, fill_value=0.0)
    blocked = pd.DataFrame({"track_id": frame["track_id"].to_numpy(), "block": label, "weight": weight})[label >= 0]
    blocks = blocked.pivot_table(index="track_id", columns="block", values="weight", aggfunc="sum", fill_value=0.0)
    blocks = blocks.reindex(index=tracks, columns=range(len(base.blocks)), fill_value=0.0)
    return observed, baseline, blocks


def exposure_hours(available_age_h: np.ndarray, base: Baseline) -> np.ndarray:
    """Hours of the baseline each track was available for, given how many hours before `now`
    it became available (inf: always)."""
    if not len(base.buckets):
        return np.zeros(len(available_age_h))
    start = base.buckets.astype(np.float64) * base.bucket_hours  # bucket b covers ages [start, start + h)
    covered = np.clip(available_age_h[:, None] - start[None, :], 0.0, base.bucket_hours)
    return covered.sum(axis=1)


def dispersion(blocks: pd.DataFrame, exposure: np.ndarray, full_hours: float) -> float:
    """Pooled Pearson dispersion (variance / mean of window-sized block counts) over tracks with
    a full baseline; 1 (Poisson) when there is nothing to estimate it from."""
    m = blocks.shape[1]
    if m < 2:
        return 1.0
    x = blocks.to_numpy()[exposure >= full_hours - 1e-9]
    mean = x.mean(axis=1)
    x, mean = x[mean > 0], mean[mean > 0]
    if len(x) < 5:
        return 1.0
    pearson = ((x - mean[:, None]) ** 2 / mean[:, None]).sum() / (len(x) * (m - 1))
    return float(max(pearson, 1.0))


def score_counts(
    observed: pd.Series,
    baseline: pd.Series,
    exposure: np.ndarray,
    phi: float,
    base: Baseline,
    n_catalogue: int,
    settings: TrendingSettings,
) -> pd.DataFrame:
    """Score every track (all rows, with a `trending` flag), following the module docstring."""
    w_hours = base.window * base.bucket_hours
    mu = (baseline.sum() + 1.0) / (max(n_catalogue, 1) * max(base.hours, 1.0))
    a = settings.prior_plays
    o = observed.to_numpy(dtype=np.float64)
    shape = a + baseline.to_numpy(dtype=np.float64) / phi
    beta = a * phi / mu + exposure
    expected = phi * w_hours * shape / beta
    sd = phi * np.sqrt(w_hours * shape * (beta + w_hours)) / beta
    p_value = nbinom.sf(np.ceil(o / phi - 1e-9) - 1, shape, beta / (beta + w_hours))
    floor = o >= settings.min_plays
    cut = settings.false_trends_per_run / max(int(floor.sum()), 1)
    return pd.DataFrame(
        {
            "track_id": observed.index.to_numpy(),
            "score": (o - expected) / sd,
            "velocity": (o - expected) / w_hours,
            "observed": o,
            "expected": expected,
            "confidence": 1.0 - p_value,
            "p_value": p_value,
            "trending": floor & (o > expected) & (p_value < cut),
        }
    )


def score_buckets(
    buckets: pd.DataFrame,
    available_age_h: pd.Series,
    n_catalogue: int,
    settings: TrendingSettings,
    bucket_hours: int = 1,
) -> tuple[pd.DataFrame, float]:
    """Score tracks from (track_id, bucket, weight) rows; returns (all scored rows, φ)."""
    base = baseline_for(settings, bucket_hours)
    observed, baseline, blocks = window_counts(buckets, base)
    if observed.empty:
        return _empty(with_flag=True), 1.0
    age = available_age_h.reindex(observed.index).fillna(np.inf).to_numpy(dtype=np.float64)
    exposure = exposure_hours(age, base)
    blocked = _blocks_only(base)  # the remainder hours of the baseline make no block
    phi = dispersion(blocks, exposure_hours(age, blocked), blocked.hours)
    return score_counts(observed, baseline, exposure, phi, base, n_catalogue, settings), phi


def _blocks_only(base: Baseline) -> Baseline:
    buckets = np.concatenate(base.blocks) if base.blocks else np.zeros(0, dtype=np.int64)
    return Baseline(base.window, buckets, base.blocks, base.bucket_hours)


def available_age_hours(first_ms: pd.Series, now_ms: int, tracks: pd.DataFrame | None = None) -> pd.Series:
    """Hours before `now` each track became available: its release date when the catalogue
    has one, else its first event of any type (a late estimate for rarely played tracks, which
    errs toward not trending)."""
    since = first_ms.astype("float64")
    if tracks is not None and "release_date" in tracks.columns:
        released = pd.to_datetime(tracks["release_date"], utc=True)
        released_ms = pd.Series(
            ((released - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)).to_numpy(dtype="float64", na_value=np.nan),
            index=tracks["track_id"].to_numpy(),
        )
        released_ms = released_ms[~released_ms.index.duplicated()].reindex(since.index)
        since = released_ms.where(released_ms.notna(), since)
    return ((now_ms - since) / HOUR_MS).fillna(np.inf)


def select(scored: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """The trending rows, best first, at most top_k, in COLUMNS."""
    rows = scored[scored["trending"]]
    rows = rows.sort_values(["score", "observed", "track_id"], ascending=[False, False, True], kind="stable")
    return rows.head(top_k)[COLUMNS].reset_index(drop=True)


def to_now_ms(now) -> int:
    now = pd.Timestamp(now)
    now = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
    return int((now - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1))


def trending_scores(
    events: pd.DataFrame,
    now: pd.Timestamp,
    settings: TrendingSettings,
    tracks: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Top `settings.top_k` trending tracks at `now`, best first (columns: COLUMNS), from raw
    events in one process. The job computes the same from Ray Data partials.

    `events` needs track_id, event_type and timestamp. Event types missing from
    `settings.event_weights` add no plays but show that a track existed. Events at or after
    `now` are ignored. `tracks` (track_id, optional release_date) adds unplayed catalogue tracks
    to the denominator of μ and release dates to the exposure.
    """
    missing = [c for c in ("track_id", "event_type", "timestamp") if c not in events.columns]
    if missing:
        raise ValueError(f"events is missing columns {missing}")
    if tracks is not None and "track_id" not in tracks.columns:
        raise ValueError("tracks is missing column 'track_id'")
    now_ms = to_now_ms(now)
    base = baseline_for(settings)
    frame = events[["track_id", "event_type", "timestamp"]].copy()
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    aggregate = HourlyAggregator(now_ms, base.horizon, settings.window_hours, dict(settings.event_weights), by_locale=False)
    hourly = hourly_frame(combine([aggregate(frame)]))
    if hourly.empty:
        return _empty()
    first = hourly.groupby("track_id")["first_ms"].min()
    n_catalogue = len(first) if tracks is None else len(pd.Index(tracks["track_id"]).union(first.index))
    scored, phi = score_buckets(hourly, available_age_hours(first, now_ms, tracks), n_catalogue, settings)
    result = select(scored, settings.top_k)
    log.debug("trending at %s: %d of %d tracks (phi %.2f)", now, len(result), len(scored), phi)
    return result


def _empty(with_flag: bool = False) -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in COLUMNS}).astype({"track_id": object})
    if with_flag:
        frame["trending"] = pd.Series(dtype=bool)
    return frame
