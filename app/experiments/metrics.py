"""Per-user experiment metrics from the event log, computed in mergeable partial aggregates.

An exposure is an impression event carrying the experiment; a user belongs to the variant of
their exposures from their first exposure on (users seen in two variants are dropped and
counted). Every event of an exposed user is then attributed: from the first exposure on it
counts towards the experiment, in the `pre_period_ms` before it towards the CUPED covariate.

The work is split so that Ray Data can run it per batch: `MetricsAccumulator.add(table)` on
any slice of the events, `merge` of the partial results in any order, `finish()` once.
Everything is dense numpy arrays indexed by the exposed user's position, so merging is a sum.

    acc = MetricsAccumulator(exposures, experiment="mmr-test", catalogue=genres)
    acc.add(table); ...; users = acc.finish()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

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

EXPOSURE_COLUMNS = ["user_id", "event_type", "timestamp", "experiment", "variant"]
EVENT_COLUMNS = ["user_id", "track_id", "event_type", "timestamp", "duration_ms", "position", "recommendation_id", "experiment", "session_id"]


@dataclass
class Exposures:
    """Exposed users: id, variant index, first exposure (epoch ms)."""

    variants: list[str]
    user_ids: pa.Array
    variant_idx: np.ndarray
    first_ms: np.ndarray
    conflicting_users: int = 0

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


def exposure_partial(table: pa.Table, experiment: str) -> pd.DataFrame:
    """(user_id, variant) -> first exposure ms and count, for the impressions of one experiment."""
    mask = pc.and_(pc.equal(table["experiment"], experiment), pc.equal(table["event_type"], "impression"))
    t = table.filter(pc.fill_null(mask, False))
    df = pd.DataFrame(
        {
            "user_id": t["user_id"].to_numpy(zero_copy_only=False),
            "variant": t["variant"].to_numpy(zero_copy_only=False),
            "ts": t["timestamp"].cast(pa.int64()).to_numpy(zero_copy_only=False),
        }
    )
    return df.groupby(["user_id", "variant"], as_index=False).agg(first_ms=("ts", "min"), exposures=("ts", "size"))


def combine_exposures(partials: list[pd.DataFrame], variants: list[str]) -> Exposures:
    """One row per exposed user; users exposed to two variants are dropped (counted)."""
    df = pd.concat(partials, ignore_index=True) if partials else pd.DataFrame(columns=["user_id", "variant", "first_ms", "exposures"])
    df = df[df["variant"].isin(variants)]
    df = df.groupby(["user_id", "variant"], as_index=False)["first_ms"].min()
    n_variants = df.groupby("user_id")["variant"].transform("size")
    conflicting = int(df.loc[n_variants > 1, "user_id"].nunique())
    df = df[n_variants == 1].sort_values("user_id", kind="mergesort")
    return Exposures(
        variants=list(variants),
        user_ids=pa.array(df["user_id"].to_numpy(), pa.string()),
        variant_idx=df["variant"].map({v: i for i, v in enumerate(variants)}).to_numpy(np.int64),
        first_ms=df["first_ms"].to_numpy(np.int64),
        conflicting_users=conflicting,
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
    ild_parts: pd.DataFrame  # recommendation_id, user, genre counts, for recs split over batches
    daily: pd.DataFrame  # variant, day, impressions, clicks, plays, listen_ms

    def merge(self, other: "Partial") -> "Partial":
        return Partial(
            sums={k: self.sums[k] + other.sums[k] for k in self.sums},
            sessions=_unique_pairs(*np.concatenate([self.sessions, other.sessions]).T),
            pre_sessions=_unique_pairs(*np.concatenate([self.pre_sessions, other.pre_sessions]).T),
            latency_hist=self.latency_hist + other.latency_hist,
            recommended=_unique_pairs(*np.concatenate([self.recommended, other.recommended]).T),
            ild_parts=pd.concat([self.ild_parts, other.ild_parts], ignore_index=True),
            daily=pd.concat([self.daily, other.daily]).groupby(["variant", "day"], as_index=False).sum(),
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


def _user_sessions(u: np.ndarray, session_id: pa.ChunkedArray, mask: np.ndarray) -> np.ndarray:
    """Distinct (user, session) pairs. Sessions are hashed to stable 64-bit codes (so that
    pieces from different batches line up); only each batch's distinct ids are hashed."""
    if not mask.any():
        return np.empty((0, 2), np.int64)
    encoded = pc.dictionary_encode(session_id.filter(pa.array(mask)).fill_null("")).combine_chunks()
    codes = pd.util.hash_array(np.asarray(encoded.dictionary.to_numpy(zero_copy_only=False), dtype=object), categorize=False).view(np.int64)
    return _unique_pairs(u[mask], codes[encoded.indices.to_numpy(zero_copy_only=False)])


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
        """The partial sums of one slice of events (any slice; order does not matter)."""
        out = self.empty()
        n = self.exposures.n_users
        user = pc.index_in(table["user_id"], value_set=self.exposures.user_ids)
        keep = pc.is_valid(user)
        if not pc.any(keep).as_py():
            return out
        t = table.filter(keep)
        u = user.filter(keep).to_numpy(zero_copy_only=False).astype(np.int64)
        ts = t["timestamp"].cast(pa.int64()).to_numpy(zero_copy_only=False)
        first = self.exposures.first_ms[u]
        post, pre = ts >= first, (ts < first) & (ts >= first - self.pre_period_ms)
        etype = t["event_type"]
        is_type = lambda name: pc.fill_null(pc.equal(etype, name), False).to_numpy(zero_copy_only=False)  # noqa: E731
        duration = t["duration_ms"].fill_null(0).to_numpy(zero_copy_only=False).astype(float)
        in_exp = pc.fill_null(pc.equal(t["experiment"], self.experiment), False).to_numpy(zero_copy_only=False)
        impression = is_type("impression") & in_exp & post
        click, play = is_type("click") & post, is_type("play")
        s = out.sums

        def add_to(name: str, mask: np.ndarray, weights: np.ndarray | None = None) -> None:
            s[name] += np.bincount(u[mask], weights=None if weights is None else weights[mask], minlength=n)

        add_to("impressions", impression)
        add_to("clicks", click)
        add_to("plays", play & post)
        add_to("likes", is_type("like") & post)
        add_to("skips", is_type("skip") & post)
        add_to("listen_ms", play & post, duration)
        add_to("pre_listen_ms", play & pre, duration)
        out.sessions = _user_sessions(u, t["session_id"], play & post)
        out.pre_sessions = _user_sessions(u, t["session_id"], play & pre)

        variant = self.exposures.variant_idx[u]
        # One latency per request: the first item's impression carries the serving time.
        first_item = impression & (t["position"].fill_null(-1).to_numpy(zero_copy_only=False) == 0)
        lat = np.clip(duration[first_item], 0, MAX_LATENCY_MS).astype(np.int64)
        np.add.at(out.latency_hist, (variant[first_item], lat), 1)

        if self.track_ids is not None and impression.any():
            track = pc.index_in(t["track_id"].filter(pa.array(impression)), value_set=self.track_ids).fill_null(-1).to_numpy(zero_copy_only=False)
            out.recommended = _unique_pairs(variant[impression], track)
            out.ild_parts = self._ild_parts(t["recommendation_id"].filter(pa.array(impression)), u[impression], track)

        day = ts // DAY_MS
        daily = pd.DataFrame({"variant": variant, "day": day, "impressions": impression, "clicks": click, "plays": play & post, "listen_ms": np.where(play & post, duration, 0.0)})
        daily = daily[post]
        out.daily = daily.groupby(["variant", "day"], as_index=False).sum()
        return out

    def _ild_parts(self, rec_ids: pa.Array, users: np.ndarray, track: np.ndarray) -> pd.DataFrame:
        genre = np.where(track >= 0, self.track_genres[np.maximum(track, 0)], self.n_genres - 1)
        codes, uniques = pd.factorize(np.asarray(rec_ids.fill_null("").to_numpy(zero_copy_only=False), dtype=object))
        counts = np.bincount(codes * self.n_genres + genre, minlength=len(uniques) * self.n_genres).reshape(len(uniques), self.n_genres)
        rec_user = np.zeros(len(uniques), np.int64)
        rec_user[codes] = users
        frame = pd.DataFrame(counts, columns=[f"g{i}" for i in range(self.n_genres)])
        frame.insert(0, "user", rec_user)
        frame.insert(0, "rec", uniques)
        return frame

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
