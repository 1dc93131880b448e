"""Hourly trending counts, computed per block of events and combined: the map and reduce halves
of the trending job's aggregation.

Ray Data's hash-shuffle groupby was measured about 200x slower than pandas on a 2M-row count,
so the job aggregates each piece of Parquet (a file's run of row groups) in one task with
`aggregate_parquet` and `combine`s the partials on the driver. Everything inside is integer
codes and numpy: strings are dictionary codes (read as dictionaries straight from Parquet, or
encoded once per block), keys are mixed-radix integers, sums are `np.bincount`. A partial
(`HourlyPartial`) carries only its own distinct tracks and locales as strings; merging unifies
those small dictionaries and remaps the codes, so no per-row string work happens after the read.

`combine` returns one table with one row per key:

    kind=HOURLY   (track_id, bucket=hours before `now`)            global counts, every event
    kind=LOCALE   (track_id, locale, bucket=windows before `now`)  weighted events in the horizon
    kind=COUNTER  (locale=<reason>)                                 events set aside, by reason

Buckets count back from `now` (bucket 0 is the last hour), so a window is an exact range of
buckets whatever minute `now` falls on, and event order within or across files is irrelevant.
Events older than the horizon land in the `horizon` bucket: they only tell us the track existed.
Events at or after `now` (clock skew, or a replay evaluated in the past) and events without a
track or timestamp are not scored, but counted under COUNTER rows so every input row is
accounted for: sum(events) over all rows == rows read. `first_ms` (HOURLY rows) is the track's
first scored event over all partials.

    agg = HourlyAggregator(now_ms, horizon_hours=192, window_hours=24, weights={"play": 1.0})
    partials = [agg(block) for block in blocks]      # or aggregate_parquet(path, agg)
    counts = combine(partials)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.parquet_pieces import dictionary_codes, epoch_ms, iter_tables

HOUR_MS = 3_600_000
HOURLY, LOCALE, COUNTER = 0, 1, 2
FUTURE, INVALID = "future", "invalid"
NEVER = np.iinfo(np.int64).max
DENSE_BINS = 1 << 25
"""Largest key space counted with a dense bincount (256 MB of float64); sparser keys are sorted."""

PARTIAL_SCHEMA = pa.schema(
    [
        ("kind", pa.int8()),
        ("track_id", pa.string()),
        ("locale", pa.string()),
        ("bucket", pa.int32()),
        ("weight", pa.float64()),
        ("events", pa.int64()),
        ("first_ms", pa.int64()),
    ]
)
EVENT_COLUMNS = ["track_id", "event_type", "timestamp"]
DICTIONARY_COLUMNS = ["track_id", "event_type", "locale"]
"""Read as Parquet dictionaries: the file already stores them so, and codes are what we count on."""


@dataclass
class HourlyPartial:
    """Mergeable sums of one slice of events. `track`/`locale` columns are codes into this
    partial's own `tracks`/`locales`; `first_ms` is per entry of `tracks`."""

    tracks: pa.Array
    first_ms: np.ndarray
    hourly: dict[str, np.ndarray]  # track, bucket, weight, events
    locales: pa.Array
    local: dict[str, np.ndarray]  # track, locale, bucket, weight, events
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def events(self) -> int:
        return int(self.hourly["events"].sum()) + sum(self.counters.values())


def _empty_sums(*keys: str) -> dict[str, np.ndarray]:
    return {**{k: np.zeros(0, np.int64) for k in keys}, "weight": np.zeros(0), "events": np.zeros(0, np.int64)}


def empty_partial() -> HourlyPartial:
    return HourlyPartial(pa.array([], pa.string()), np.zeros(0, np.int64), _empty_sums("track", "bucket"), pa.array([], pa.string()),
                         _empty_sums("track", "locale", "bucket"))


def sum_by_key(keys: dict[str, tuple[np.ndarray, int]], weight: np.ndarray, events: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Sum `weight` and `events` (1 per row when None) per distinct tuple of integer codes;
    `keys` maps a name to (codes, size) with codes in range(size). Returns each distinct
    tuple's codes under the same names (sorted by key), with "weight" and "events"."""
    key = np.zeros(len(weight), np.int64)
    for codes, size in keys.values():
        key = key * size + codes
    space = int(np.prod([size for _, size in keys.values()], dtype=np.float64))
    if space <= min(4 * len(key) + 4096, DENSE_BINS):  # dense: linear, no sort; measured faster up to ~4 bins a row
        counts = np.bincount(key, weights=events, minlength=space)
        hit = np.flatnonzero(counts)
        sums, counts = np.bincount(key, weights=weight, minlength=space)[hit], counts[hit]
    else:
        hit, inverse = np.unique(key, return_inverse=True)
        sums, counts = np.bincount(inverse, weights=weight, minlength=len(hit)), np.bincount(inverse, weights=events, minlength=len(hit))
    out = {}
    for name, (_, size) in reversed(keys.items()):
        out[name] = hit % size
        hit = hit // size
    return {name: out[name] for name in keys} | {"weight": sums, "events": np.rint(counts).astype(np.int64)}


@dataclass(frozen=True)
class HourlyAggregator:
    """Callable on one block (pyarrow Table or pandas DataFrame with track_id, event_type,
    timestamp and optionally locale); returns an `HourlyPartial`."""

    now_ms: int
    horizon_hours: int
    window_hours: int
    weights: dict[str, float] = field(default_factory=dict)
    by_locale: bool = True

    def __call__(self, block) -> HourlyPartial:
        table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
        if table.num_rows == 0:
            return empty_partial()
        ts, has_ts = epoch_ms(table["timestamp"])
        tracks, codes = dictionary_codes(table["track_id"])
        valid = has_ts & (codes >= 0)
        future = valid & (ts >= self.now_ms)
        scored = valid & ~future
        age = (self.now_ms - ts) // HOUR_MS  # floor: an event 1 ms before now is in bucket 0

        types, type_codes = dictionary_codes(table["event_type"])
        per_type = np.asarray([max(self.weights.get(t, 0.0), 0.0) if t is not None else 0.0 for t in types.to_pylist()] + [0.0])
        weight = per_type[type_codes]  # code -1 (null type) picks the trailing 0

        codes, age, weight, ts_kept = codes[scored], age[scored], weight[scored], ts[scored]
        bucket = np.minimum(age, self.horizon_hours)
        first = np.full(len(tracks), NEVER, np.int64)
        np.minimum.at(first, codes, ts_kept)
        hourly = sum_by_key({"track": (codes, len(tracks)), "bucket": (bucket, self.horizon_hours + 1)}, weight)

        locales, local = pa.array([], pa.string()), _empty_sums("track", "locale", "bucket")
        if self.by_locale and "locale" in table.column_names:
            locales, loc_codes = dictionary_codes(table["locale"])
            loc_codes = loc_codes[scored]
            keep = (weight > 0) & (age < self.horizon_hours) & (loc_codes >= 0)
            n_blocks = self.horizon_hours // self.window_hours + 1
            local = sum_by_key({"track": (codes[keep], len(tracks)), "locale": (loc_codes[keep], len(locales)),
                                "bucket": (age[keep] // self.window_hours, n_blocks)}, weight[keep])

        counters = {FUTURE: int(future.sum()), INVALID: int((~valid).sum())}
        return HourlyPartial(tracks, first, hourly, locales, local, {k: v for k, v in counters.items() if v})


def merge(partials: list[HourlyPartial]) -> HourlyPartial:
    """One partial with the sums of all (the reduce half; associative, any order)."""
    partials = [p for p in partials if p.events]
    if len(partials) <= 1:
        return partials[0] if partials else empty_partial()
    tracks, track_maps = _unify([p.tracks for p in partials])
    locales, locale_maps = _unify([p.locales for p in partials])
    first = np.full(len(tracks), NEVER, np.int64)
    for p, m in zip(partials, track_maps):
        np.minimum.at(first, m, p.first_ms)

    def cat(part: str, name: str, maps: list[np.ndarray] | None = None) -> np.ndarray:
        cols = [getattr(p, part)[name] for p in partials]
        return np.concatenate([m[c] for m, c in zip(maps, cols)] if maps is not None else cols)

    h_bucket = cat("hourly", "bucket")
    hourly = sum_by_key({"track": (cat("hourly", "track", track_maps), len(tracks)), "bucket": (h_bucket, int(h_bucket.max(initial=0)) + 1)},
                        cat("hourly", "weight"), cat("hourly", "events"))
    l_bucket = cat("local", "bucket")
    local = sum_by_key({"track": (cat("local", "track", track_maps), len(tracks)), "locale": (cat("local", "locale", locale_maps), max(len(locales), 1)),
                        "bucket": (l_bucket, int(l_bucket.max(initial=0)) + 1)}, cat("local", "weight"), cat("local", "events"))
    counters: dict[str, int] = {}
    for p in partials:
        for k, v in p.counters.items():
            counters[k] = counters.get(k, 0) + v
    return HourlyPartial(tracks, first, hourly, locales, local, counters)


def combine(partials: list[HourlyPartial]) -> pa.Table:
    """Merge partials into one PARTIAL_SCHEMA table (strings decoded once, at the end)."""
    p = merge(list(partials))
    h, loc = p.hourly, p.local
    n_h, n_l, n_c = len(h["track"]), len(loc["track"]), len(p.counters)
    reasons = sorted(p.counters)
    return pa.table(
        {
            "kind": np.concatenate([np.full(n_h, HOURLY), np.full(n_l, LOCALE), np.full(n_c, COUNTER)]).astype(np.int8),
            "track_id": pa.concat_arrays([p.tracks.take(h["track"]), p.tracks.take(loc["track"]), pa.array([""] * n_c, pa.string())]),
            "locale": pa.concat_arrays([pa.array([""] * n_h, pa.string()), p.locales.take(loc["locale"]), pa.array(reasons, pa.string())]),
            "bucket": np.concatenate([h["bucket"], loc["bucket"], np.zeros(n_c, np.int64)]).astype(np.int32),
            "weight": np.concatenate([h["weight"], loc["weight"], np.zeros(n_c)]),
            "events": np.concatenate([h["events"], loc["events"], np.asarray([p.counters[r] for r in reasons], np.int64)]),
            "first_ms": pa.concat_arrays([pa.array(p.first_ms[h["track"]]), pa.nulls(n_l + n_c, pa.int64())]),
        },
        schema=PARTIAL_SCHEMA,
    )


def counters(combined: pa.Table) -> dict[str, int]:
    """Events set aside by reason (future, invalid)."""
    rows = combined.filter(pc.equal(combined["kind"], COUNTER))
    return {loc: int(ev) for loc, ev in zip(rows["locale"].to_pylist(), rows["events"].to_pylist())}


def aggregate_parquet(path: str, row_groups: list[int] | None, aggregate: HourlyAggregator, batch_rows: int = 1 << 20) -> HourlyPartial:
    """One partial for row groups of a Parquet file (app/parquet_pieces.py: needed columns only,
    strings as dictionaries, bounded memory). A file without a column counts its rows invalid."""
    columns = EVENT_COLUMNS + (["locale"] if aggregate.by_locale else [])
    return merge([aggregate(t) for t in iter_tables(path, row_groups, columns, DICTIONARY_COLUMNS, batch_rows)])


def _unify(dictionaries: list[pa.Array]) -> tuple[pa.Array, list[np.ndarray]]:
    """One dictionary for several, and each one's codes into it."""
    # One code array per dictionary, empty ones included (a chunked array would drop them and
    # misalign the rest).
    unified = pc.unique(pa.chunked_array(dictionaries, pa.string()).combine_chunks()) if dictionaries else pa.array([], pa.string())
    return unified, [np.asarray(pc.index_in(d.cast(pa.string()), value_set=unified), dtype=np.int64) for d in dictionaries]
