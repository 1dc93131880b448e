"""Per-user experiment metrics from the event log, computed in mergeable partial aggregates.

An exposure is an impression event carrying the experiment; a user belongs to the variant of
their exposures from their first exposure on (users seen in two variants are dropped and
counted). Every event of an exposed user is then attributed: from the first exposure until
their variant's window closes (the experiment's stop or the variant's kill, after which they
get the defaults) it counts towards the experiment, in the `pre_period_ms` before the first
exposure towards the CUPED covariate.

The work is split so that Ray Data can run it per batch: `MetricsAccumulator.add(table)` on
any slice of the events (`add_parquet` on a piece of a file), `merge_partials` of the partial
results in any order, `finish()` once. Everything is dense numpy arrays indexed by the exposed
user's position, so merging is a sum. Strings are never compared row by row: each column's
dictionary (as read from Parquet, or encoded once per batch) is matched, and rows are indexed
by its integer codes; sessions and recommendations become stable 64-bit hashes.

    acc = MetricsAccumulator(exposures, experiment="mmr-test", catalogue=genres)
    acc.add(table); ...; users = acc.finish()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from app.parquet_pieces import dictionary_codes, epoch_ms, iter_tables

DAY_MS = 86_400_000
MAX_LATENCY_MS = 60_000

HIGHER_IS_BETTER = {
    "ctr": True,
    "users_clicking": True,
    "like_rate": True,
    "skip_rate": False,
    "listening_ms_per_user": True,
    "sessions_per_user": True,
    "intra_list_diversity": True,
    "latency_p95_ms": False,
    "coverage": True,
}
"""Every metric the evaluator reports, and which direction is good."""

DESCRIPTIVE_METRICS = frozenset({"latency_p95_ms", "coverage"})
"""Reported per variant but never tested (one figure per arm, no per-user values): only a
threshold guardrail can watch them."""

NO_END = np.iinfo(np.int64).max
"""The window end of a variant still running."""

EXPOSURE_COLUMNS = ["user_id", "event_type", "timestamp", "experiment", "variant"]
EVENT_COLUMNS = ["user_id", "track_id", "event_type", "timestamp", "duration_ms", "position", "recommendation_id", "experiment", "session_id"]
DICTIONARY_COLUMNS = ["user_id", "track_id", "event_type", "recommendation_id", "experiment", "session_id"]
"""Read as Parquet dictionaries: every string the metrics need is matched or counted by code."""
EVENT_TYPES = ("impression", "click", "play", "like", "skip")
IMPRESSION, CLICK, PLAY, LIKE, SKIP = range(len(EVENT_TYPES))


@dataclass
class Exposures:
    """Exposed users: id, variant index, first exposure (epoch ms)."""

    variants: list[str]
    user_ids: pa.Array
    variant_idx: np.ndarray
    first_ms: np.ndarray
    conflicting_users: int = 0
    end_ms: np.ndarray | None = None
    """Per variant, when its attribution window closes (`attribution_ends`); None: all open."""

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def window_ends(self) -> np.ndarray:
        return self.end_ms if self.end_ms is not None else np.full(len(self.variants), NO_END, np.int64)


def attribution_ends(variants: list[str], stopped_at_ms: int | None, killed_at_ms: dict[str, int | None]) -> dict[str, int]:
    """Per variant, when its attribution window closes: the experiment's stop or the variant's
    kill, whichever came first; a variant with neither is left out (still open). After it the
    users get the defaults, so their events say nothing more about the variant."""
    out = {}
    for v in variants:
        times = [t for t in (stopped_at_ms, killed_at_ms.get(v)) if t is not None]
        if times:
            out[v] = min(times)
    return out


def exposure_partial(table: pa.Table, experiment: str) -> pd.DataFrame:
    """(user_id, variant) -> first exposure ms and count, for the impressions of one experiment.
    Integer work on dictionary codes; strings only for the distinct pairs found."""
    rows = np.flatnonzero((_lookup(table["experiment"], [experiment]) == 0) & (_lookup(table["event_type"], ["impression"]) == 0))
    users, user_codes = dictionary_codes(table["user_id"])
    variants, variant_codes = dictionary_codes(table["variant"])
    ts, has_ts = epoch_ms(table["timestamp"])
    u, v, ts = user_codes[rows], variant_codes[rows], ts[rows]
    ok = (u >= 0) & (v >= 0) & has_ts[rows]
    pairs, inverse = np.unique(u[ok] * len(variants) + v[ok], return_inverse=True)
    first = np.full(len(pairs), np.iinfo(np.int64).max)
    np.minimum.at(first, inverse, ts[ok])
    return pd.DataFrame(
        {
            "user_id": users.take(pairs // max(len(variants), 1)).to_numpy(zero_copy_only=False),
            "variant": variants.take(pairs % max(len(variants), 1)).to_numpy(zero_copy_only=False),
            "first_ms": first,
            "exposures": np.bincount(inverse, minlength=len(pairs)),
        }
    )


def exposures_in_parquet(path: str, row_groups: list[int] | None, experiment: str) -> pd.DataFrame:
    """`exposure_partial` of a piece of an event Parquet file (app/parquet_pieces.py)."""
    frames = [exposure_partial(t, experiment) for t in iter_tables(path, row_groups, EXPOSURE_COLUMNS, [c for c in EXPOSURE_COLUMNS if c != "timestamp"])]
    return pd.concat(frames, ignore_index=True) if frames else exposure_partial(pa.table({c: pa.nulls(0, pa.string()) for c in EXPOSURE_COLUMNS}), experiment)


def _lookup(column, values: list[str]) -> np.ndarray:
    """Per row, the index of its value in `values` (-1 if none or null), via the dictionary."""
    dictionary, codes = dictionary_codes(column)
    found = pc.index_in(dictionary, value_set=pa.array(values, pa.string())).fill_null(-1)
    return np.append(np.asarray(found, dtype=np.int64), -1)[codes]  # code -1 (null) -> -1


def _stable_hashes(strings: pa.Array) -> np.ndarray:
    """64-bit hashes of strings that agree across batches and processes (pandas' siphash)."""
    return pd.util.hash_array(np.asarray(strings.to_numpy(zero_copy_only=False), dtype=object), categorize=False).view(np.int64)


def combine_exposures(partials: list[pd.DataFrame], variants: list[str], end_ms: dict[str, int] | None = None) -> Exposures:
    """One row per exposed user; users exposed to two variants are dropped (counted). A user
    first exposed once their variant's window had closed (`end_ms`, from `attribution_ends`:
    replicas see a stop or kill only at their next refresh) is not in the experiment."""
    ends = np.array([(end_ms or {}).get(v, NO_END) for v in variants], np.int64)
    df = pd.concat(partials, ignore_index=True) if partials else pd.DataFrame(columns=["user_id", "variant", "first_ms", "exposures"])
    df = df[df["variant"].isin(variants)]
    df = df.groupby(["user_id", "variant"], as_index=False)["first_ms"].min()
    df = df[df["first_ms"].to_numpy(np.int64) < ends[df["variant"].map({v: i for i, v in enumerate(variants)}).to_numpy(np.int64)]]
    n_variants = df.groupby("user_id")["variant"].transform("size")
    conflicting = int(df.loc[n_variants > 1, "user_id"].nunique())
    df = df[n_variants == 1].sort_values("user_id", kind="mergesort")
    return Exposures(
        variants=list(variants),
        user_ids=pa.array(df["user_id"].to_numpy(), pa.string()),
        variant_idx=df["variant"].map({v: i for i, v in enumerate(variants)}).to_numpy(np.int64),
        first_ms=df["first_ms"].to_numpy(np.int64),
        conflicting_users=conflicting,
        end_ms=ends,
    )


def _daily(variant: np.ndarray, day: np.ndarray, impressions: np.ndarray, clicks: np.ndarray, plays: np.ndarray, listen_ms: np.ndarray) -> pd.DataFrame:
    """Per (variant, day) sums for the report's series, one row per pair with any event."""
    if not len(day):
        return pd.DataFrame({"variant": [], "day": [], "impressions": [], "clicks": [], "plays": [], "listen_ms": []}, dtype=np.int64).astype({"listen_ms": float})
    d0, days = int(day.min()), int(day.max() - day.min()) + 1
    key = variant * days + (day - d0)
    size = (int(variant.max()) + 1) * days
    hit = np.flatnonzero(np.bincount(key, minlength=size))
    count = lambda w: np.bincount(key, weights=w, minlength=size)[hit]  # noqa: E731
    return pd.DataFrame(
        {
            "variant": hit // days,
            "day": hit % days + d0,
            "impressions": count(impressions).astype(np.int64),
            "clicks": count(clicks).astype(np.int64),
            "plays": count(plays).astype(np.int64),
            "listen_ms": count(listen_ms),
        }
    )


USER_SUMS = ("impressions", "clicks", "plays", "likes", "skips", "listen_ms", "recs", "ild_sum", "pre_listen_ms")


@dataclass
class Partial:
    """Mergeable sums. Dense per-user arrays, plus keyed pieces that need a final dedup."""

    sums: dict[str, np.ndarray]
    sessions: np.ndarray  # (user index, session hash) pairs, post-period plays
    pre_sessions: np.ndarray  # same, pre-period
    latency_hist: np.ndarray  # (variants, MAX_LATENCY_MS + 1) counts of per-request latency
    recommended: np.ndarray  # (variant index, track code) pairs seen in impressions
    ild_parts: pd.DataFrame  # recommendation (64-bit hash of its id), user, genre counts; a list may span batches
    daily: pd.DataFrame  # variant, day, impressions, clicks, plays, listen_ms

    def merge(self, other: "Partial") -> "Partial":
        return merge_partials([self, other])


def merge_partials(partials: list[Partial]) -> Partial:
    """One partial for many, concatenating and deduplicating once (merging pairwise in a loop
    would copy the growing keyed pieces again at every step)."""
    if len(partials) == 1:
        return partials[0]

    def pairs(name: str) -> np.ndarray:
        return _unique_pairs(*np.concatenate([getattr(p, name) for p in partials]).T)

    def total(arrays) -> np.ndarray:  # in place into one copy: memory of one array, not of all stacked
        out = None
        for a in arrays:
            out = a.copy() if out is None else np.add(out, a, out=out)
        return out

    ild = [p.ild_parts for p in partials if len(p.ild_parts)]
    return Partial(
        sums={k: total(p.sums[k] for p in partials) for k in partials[0].sums},
        sessions=pairs("sessions"),
        pre_sessions=pairs("pre_sessions"),
        latency_hist=total(p.latency_hist for p in partials),
        recommended=pairs("recommended"),
        ild_parts=pd.concat(ild, ignore_index=True) if ild else pd.DataFrame(),
        daily=pd.concat([p.daily for p in partials]).groupby(["variant", "day"], as_index=False).sum(),
    )


@dataclass
class UserMetrics:
    """What the statistics run on: per exposed user sums, per variant descriptive figures."""

    variants: list[str]
    variant_idx: np.ndarray
    columns: dict[str, np.ndarray]
    latency_p95_ms: dict[str, float]
    coverage: dict[str, float]
    daily: pd.DataFrame
    conflicting_users: int = 0
    has_pre_period: bool = False
    extra: dict = field(default_factory=dict)

    def arm(self, variant: str, column: str) -> np.ndarray:
        return self.columns[column][self.variant_idx == self.variants.index(variant)]

    def users(self, variant: str) -> int:
        return int((self.variant_idx == self.variants.index(variant)).sum())


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distinct (a, b) rows of two int64 columns (b may be a 64-bit hash). Deduplicates on one
    mixed 64-bit key, one hash pass instead of a lexicographic sort."""
    if not len(a):
        return np.empty((0, 2), np.int64)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    with np.errstate(over="ignore"):
        key = b ^ (a * np.int64(-7046029254386353131))  # odd 64-bit multiplier: a bijection of a
    first = ~pd.Series(key).duplicated().to_numpy()  # hash-based: linear, no sort
    return np.stack([a[first], b[first]], axis=1)


class MetricsAccumulator:
    def __init__(self, exposures: Exposures, experiment: str, track_ids: pa.Array | None = None, track_genres: np.ndarray | None = None, pre_period_ms: int = 7 * DAY_MS):
        """`track_ids`/`track_genres` (genre index per catalogue track) enable diversity and
        coverage as a share of the catalogue; without them diversity is not computed."""
        self.exposures = exposures
        self.experiment = experiment
        self.track_ids = track_ids
        self.track_genres = track_genres
        self.n_genres = int(track_genres.max()) + 2 if track_genres is not None and len(track_genres) else 1
        self.pre_period_ms = pre_period_ms

    def empty(self) -> Partial:
        n, v = self.exposures.n_users, len(self.exposures.variants)
        return Partial(
            sums={k: np.zeros(n) for k in USER_SUMS},
            sessions=np.empty((0, 2), np.int64),
            pre_sessions=np.empty((0, 2), np.int64),
            latency_hist=np.zeros((v, MAX_LATENCY_MS + 1), np.int64),
            recommended=np.empty((0, 2), np.int64),
            ild_parts=pd.DataFrame(),
            daily=pd.DataFrame(columns=["variant", "day", "impressions", "clicks", "plays", "listen_ms"], dtype=np.int64),
        )

    def add(self, table: pa.Table) -> Partial:
        """The partial sums of one slice of events (any slice; order does not matter). String
        columns are matched on their dictionaries (distinct values), rows on integer codes."""
        out = self.empty()
        n = self.exposures.n_users
        if table.num_rows == 0:
            return out
        users, user_codes = dictionary_codes(table["user_id"])
        exposed = np.append(np.asarray(pc.index_in(users, value_set=self.exposures.user_ids).fill_null(-1), dtype=np.int64), -1)[user_codes]
        rows = np.flatnonzero(exposed >= 0)
        if not len(rows):
            return out
        every = len(rows) == table.num_rows
        pick = (lambda a: a) if every else (lambda a: a[rows])  # noqa: E731 (skip the copy when all rows count)
        u = pick(exposed)
        ts, has_ts = epoch_ms(table["timestamp"])
        ts, has_ts = pick(ts), pick(has_ts)
        first = self.exposures.first_ms[u]
        variant = self.exposures.variant_idx[u]
        end = self.exposures.window_ends()[variant]
        post, pre = has_ts & (ts >= first) & (ts < end), has_ts & (ts < first) & (ts >= first - self.pre_period_ms)
        etype = pick(_lookup(table["event_type"], list(EVENT_TYPES)))
        in_exp = pick(_lookup(table["experiment"], [self.experiment])) == 0
        duration = pick(np.asarray(table["duration_ms"].fill_null(0), dtype=np.float64))
        impression = (etype == IMPRESSION) & in_exp & post
        click, play = (etype == CLICK) & post, etype == PLAY
        play_post, play_pre = play & post, play & pre
        s = out.sums

        def add_to(name: str, mask: np.ndarray, weights: np.ndarray | None = None) -> None:
            s[name] += np.bincount(u[mask], weights=None if weights is None else weights[mask], minlength=n)

        add_to("impressions", impression)
        add_to("clicks", click)
        add_to("plays", play_post)
        add_to("likes", (etype == LIKE) & post)
        add_to("skips", (etype == SKIP) & post)
        add_to("listen_ms", play_post, duration)
        add_to("pre_listen_ms", play_pre, duration)
        if play.any():
            sessions, session_codes = dictionary_codes(table["session_id"])
            session_hash = np.append(_stable_hashes(sessions), _stable_hashes(pa.array([""])))[pick(session_codes)]  # null -> ""
            out.sessions = _unique_pairs(u[play_post], session_hash[play_post])
            out.pre_sessions = _unique_pairs(u[play_pre], session_hash[play_pre])

        # One latency per request: the first item's impression carries the serving time.
        first_item = impression & (pick(np.asarray(table["position"].fill_null(-1), dtype=np.int64)) == 0)
        lat = np.clip(duration[first_item], 0, MAX_LATENCY_MS).astype(np.int64)
        width = MAX_LATENCY_MS + 1
        out.latency_hist += np.bincount(variant[first_item] * width + lat, minlength=out.latency_hist.size).reshape(out.latency_hist.shape)

        if self.track_ids is not None and impression.any():
            shown = np.flatnonzero(impression) if every else rows[impression]
            tracks, track_codes = dictionary_codes(table["track_id"])
            in_catalogue = np.append(np.asarray(pc.index_in(tracks, value_set=self.track_ids).fill_null(-1), dtype=np.int64), -1)
            track = in_catalogue[track_codes[shown]]
            out.recommended = _unique_pairs(variant[impression], track)
            out.ild_parts = self._ild_parts(table["recommendation_id"], shown, u[impression], track)

        out.daily = _daily(variant[post], ts[post] // DAY_MS, impression[post], click[post], play_post[post], np.where(play_post, duration, 0.0)[post])
        return out

    def _ild_parts(self, rec_ids, shown: np.ndarray, users: np.ndarray, track: np.ndarray) -> pd.DataFrame:
        """Genre counts per recommendation (a list may be split over batches: summed in finish)."""
        genre = np.where(track >= 0, self.track_genres[np.maximum(track, 0)], self.n_genres - 1)
        recs, rec_codes = dictionary_codes(rec_ids)
        rec_codes = np.where(rec_codes[shown] >= 0, rec_codes[shown], len(recs))  # null -> ""
        uniques, codes = np.unique(rec_codes, return_inverse=True)
        counts = np.bincount(codes * self.n_genres + genre, minlength=len(uniques) * self.n_genres).reshape(len(uniques), self.n_genres)
        rec_user = np.zeros(len(uniques), np.int64)
        rec_user[codes] = users
        frame = pd.DataFrame(counts, columns=[f"g{i}" for i in range(self.n_genres)])
        frame.insert(0, "user", rec_user)
        frame.insert(0, "rec", _stable_hashes(pa.concat_arrays([recs, pa.array([""])]).take(uniques)))
        return frame

    def add_parquet(self, path: str, row_groups: list[int] | None = None) -> Partial:
        """`add` over a piece of an event Parquet file, batch by batch (app/parquet_pieces.py)."""
        return merge_partials([self.empty()] + [self.add(t) for t in iter_tables(path, row_groups, EVENT_COLUMNS, DICTIONARY_COLUMNS)])

    def finish(self, partial: Partial) -> UserMetrics:
        ex, n = self.exposures, self.exposures.n_users
        cols = {k: v.copy() for k, v in partial.sums.items()}
        cols["sessions"] = np.bincount(partial.sessions[:, 0], minlength=n).astype(float) if len(partial.sessions) else np.zeros(n)
        cols["pre_sessions"] = np.bincount(partial.pre_sessions[:, 0], minlength=n).astype(float) if len(partial.pre_sessions) else np.zeros(n)
        cols["clicked"] = (cols["clicks"] > 0).astype(float)
        if len(partial.ild_parts):
            recs = partial.ild_parts.groupby(["rec", "user"], as_index=False).sum()
            c = recs[[f"g{i}" for i in range(self.n_genres)]].to_numpy(float)
            size = c.sum(axis=1)
            ok = size >= 2
            # Share of pairs of items in the list that differ in genre.
            ild = 1 - (c * (c - 1)).sum(axis=1)[ok] / (size * (size - 1))[ok]
            users = recs["user"].to_numpy()[ok]
            cols["recs"] = np.bincount(users, minlength=n).astype(float)
            cols["ild_sum"] = np.bincount(users, weights=ild, minlength=n)
        latency = {}
        for i, v in enumerate(ex.variants):
            h = partial.latency_hist[i]
            latency[v] = float(np.searchsorted(np.cumsum(h), 0.95 * h.sum())) if h.sum() else float("nan")
        coverage = {}
        for i, v in enumerate(ex.variants):
            tracks = partial.recommended[partial.recommended[:, 0] == i, 1] if len(partial.recommended) else np.empty(0)
            coverage[v] = float((tracks >= 0).sum() / len(self.track_ids)) if self.track_ids is not None and len(self.track_ids) else float("nan")
        daily = partial.daily.copy()
        daily["variant"] = [ex.variants[int(i)] for i in daily["variant"]]
        return UserMetrics(
            variants=ex.variants,
            variant_idx=ex.variant_idx,
            columns=cols,
            latency_p95_ms=latency,
            coverage=coverage,
            daily=daily.sort_values(["day", "variant"]).reset_index(drop=True),
            conflicting_users=ex.conflicting_users,
            has_pre_period=bool(cols["pre_listen_ms"].any() or cols["pre_sessions"].any()),
        )
