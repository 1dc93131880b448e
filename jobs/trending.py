"""Detect trending tracks; publish the `trending` artifact and the Redis lists the API serves.

    ray job submit --working-dir . -- python -m jobs.trending --config ray_config.yaml

Ray Data counts weighted plays per track and hour (and per track, locale and window) inside
`map_batches`: one task per file (or ~2M rows of its row groups) that reads only the needed
columns, strings as Parquet dictionary codes, and sums with np.bincount; no shuffle (Ray Data's
hash groupby measured ~200x slower than pandas here). The driver combines the
small partials and scores them (training/trending.py): global, per-genre and per-locale lists,
smoothed across runs with the previous run's state, capped per artist, genre and category.
The artifact holds trending.parquet (global list), popular.parquet, lists.parquet (every list)
and state.parquet (smoothing state for the next run); the lists go to Redis in one atomic swap.

`now` is the time of the latest event unless given (`--now`), so a replayed or simulated
history trends as it did at its end rather than relative to the wall clock. Events at or after
`now`, events without track or timestamp and events of tracks missing from the catalogue (the
one the content job embeds: `content.catalog_path`, else the world's) are counted in the
summary, never scored and never fatal.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.artifacts import ArtifactStore
from app.config import Settings, TrendingSettings
from app.parquet_pieces import item_parts, plan_items, read_plan
from app.trending.aggregate import COUNTER, HOURLY, LOCALE, HourlyAggregator, aggregate_parquet, combine, counters, merge
from app.trending.ranking import apply_caps, empty_state, smooth
from jobs.common import event_files, timed

log = logging.getLogger(__name__)

CATALOGUE_COLUMNS = ["track_id", "release_date", "artist_id", "genre", "category"]
CATALOGUE_SOURCE_COLUMNS = {*CATALOGUE_COLUMNS, "genres", "release_year", "year", "artist", "artist_name"}
"""What CATALOGUE_COLUMNS are read or derived from (app/data/audio_catalog.py's aliases)."""


def latest_event_ms(files: list[str]) -> int | None:
    """Latest event time from the Parquet footers' statistics (no data read); None if a file
    has no statistics."""
    latest = None
    for path in files:
        meta = pq.ParquetFile(path).metadata
        col = meta.schema.names.index("timestamp")
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(col).statistics
            if stats is None or not stats.has_min_max:
                return None
            if isinstance(stats.max, int):  # unit unknown here: let the caller read the column
                return None
            ts = pd.Timestamp(stats.max)
            value = int((ts.tz_localize("UTC") if ts.tzinfo is None else ts).value // 1_000_000)
            latest = value if latest is None else max(latest, value)
    return latest


def _aggregate_pieces(pieces: pa.Table, aggregate: HourlyAggregator) -> pa.Table:
    """One task's pieces of Parquet to one pickled partial (numpy arrays and two small
    dictionaries: a few MB however many events were read)."""
    partials = [aggregate_parquet(path, groups, aggregate) for path, groups in item_parts(pieces)]
    return pa.table({"partial": pa.array([pickle.dumps(merge(partials), protocol=5)], pa.binary())})


def aggregate_events(files: list[str], now_ms: int, settings: TrendingSettings, horizon: int, rows_per_task: int = 1_000_000) -> pa.Table:
    """Ray Data: one map_batches task per ~`rows_per_task` rows of Parquet (whole row groups,
    small files grouped), each reading its own columns as dictionaries and returning one
    partial; combined on the driver. The tasks read the files themselves rather than via
    read_parquet so that strings stay Parquet dictionary codes and a piece's batches are
    reduced before anything moves."""
    import ray

    aggregate = HourlyAggregator(now_ms, horizon, settings.window_hours, dict(settings.event_weights), by_locale=True)
    plan = read_plan(files, rows_per_task)
    pieces = ray.data.from_items(plan_items(plan), override_num_blocks=max(len(plan), 1))
    partials = pieces.map_batches(_aggregate_pieces, fn_kwargs={"aggregate": aggregate}, batch_size=1, batch_format="pyarrow")
    blobs = [blob for batch in partials.iter_batches(batch_format="pyarrow", batch_size=None) for blob in batch["partial"].to_pylist()]
    return combine([pickle.loads(blob) for blob in blobs])


def catalogue_path(settings: Settings) -> Path:
    """The catalogue the content job embeds: `content.catalog_path`, else the world's."""
    return Path(settings.content.catalog_path or settings.paths.world_dir / "tracks.parquet").expanduser()


def read_catalogue(settings: Settings) -> pd.DataFrame | None:
    """CATALOGUE_COLUMNS of the catalogue, normalised as the content job normalises it (column
    aliases; a main genre and a release date derived when it has none); a row that cannot be a
    track is left out (the content job dead-letters it). None when the simulated world's
    catalogue is absent, and then no event counts as of an unknown track."""
    from app.data.audio_catalog import normalise_catalog

    path = catalogue_path(settings)
    if not path.exists():
        if settings.content.catalog_path:
            raise FileNotFoundError(f"content.catalog_path {path} does not exist")
        return None
    names = pq.read_schema(path).names
    raw = pd.read_parquet(path, columns=[c for c in names if c in CATALOGUE_SOURCE_COLUMNS])
    tracks, rejected = normalise_catalog(raw.assign(audio_path=None))  # it insists on audio; trending reads none
    if len(rejected):
        log.info("catalogue %s: %d rows are not tracks (no id, or a repeated one)", path, len(rejected))
    return tracks[[c for c in CATALOGUE_COLUMNS if c in tracks]]


def build_lists(
    combined: pa.Table,
    now_ms: int,
    settings: TrendingSettings,
    catalogue: pd.DataFrame | None,
    state: pd.DataFrame,
) -> dict:
    """Score the combined counts into lists. Returns lists, scored global rows, new state,
    popularity and counters."""
    from training.trending import available_age_hours, score_buckets, select

    rows = combined.filter(pc.not_equal(combined["kind"], COUNTER)).to_pandas()
    hourly = rows[rows["kind"] == HOURLY]
    local = rows[rows["kind"] == LOCALE]
    counts = counters(combined)
    if catalogue is not None:
        known = set(catalogue["track_id"])
        unknown = ~hourly["track_id"].isin(known)
        counts["unknown_track"] = int(hourly.loc[unknown, "events"].sum())
        hourly, local = hourly[~unknown], local[local["track_id"].isin(known)]
    counts["scored"] = int(hourly["events"].sum())
    first = hourly.groupby("track_id")["first_ms"].min()
    n_catalogue = len(first) if catalogue is None else len(pd.Index(catalogue["track_id"]).union(first.index))
    ages = available_age_hours(first, now_ms, catalogue)
    meta = catalogue.drop(columns=["release_date"], errors="ignore").drop_duplicates("track_id").set_index("track_id") if catalogue is not None else None

    def ranked(scored: pd.DataFrame, name: str, genre_cap: bool) -> pd.DataFrame:
        picked = select(scored, len(scored))
        if meta is not None:
            picked = picked.join(meta, on="track_id")
        smoothed, new_state = smooth(scored[scored["score"] > 0], state, name, now_ms, settings.smoothing_half_life_hours)
        states.append(new_state)
        lookup = pd.Series(smoothed, index=scored.loc[scored["score"] > 0, "track_id"].to_numpy())
        picked["rank_score"] = lookup.reindex(picked["track_id"].to_numpy()).fillna(0.0).to_numpy()
        picked = picked.sort_values(["rank_score", "score", "track_id"], ascending=[False, False, True], kind="stable")
        return apply_caps(
            picked, settings.top_k, settings.max_per_artist, settings.max_per_genre if genre_cap else None, dict(settings.category_caps)
        )

    states: list[pd.DataFrame] = []
    lists: dict[str, pd.DataFrame] = {}
    scored, phi = score_buckets(hourly, ages, n_catalogue, settings)
    lists["global"] = ranked(scored, "global", genre_cap=True)
    if meta is not None and "genre" in meta:
        genre_of = meta["genre"].reindex(scored["track_id"].to_numpy()).to_numpy()
        for genre in sorted({g for g in genre_of[scored["trending"].to_numpy()] if isinstance(g, str)}):
            lists[f"genre:{genre}"] = ranked(scored[genre_of == genre], f"genre:{genre}", genre_cap=False)
    for locale, part in local.groupby("locale", sort=True):
        locale_scored, _ = score_buckets(part, ages, n_catalogue, settings, bucket_hours=settings.window_hours)
        if locale_scored["trending"].any():
            lists[f"locale:{locale}"] = ranked(locale_scored, f"locale:{locale}", genre_cap=True)
    popular = hourly.groupby("track_id")["weight"].sum()
    popular = popular[popular > 0].sort_values(ascending=False, kind="stable")
    return {
        "lists": {k: v for k, v in lists.items() if not v.empty} | {"global": lists["global"]},
        "scored": scored,
        "state": pd.concat(states, ignore_index=True) if states else empty_state(),
        "popular": pd.DataFrame({"track_id": popular.index.to_numpy(), "score": popular.to_numpy()}),
        "counters": counts,
        "phi": phi,
    }


def detect_trending(settings: Settings, now: pd.Timestamp | None = None) -> dict:
    from training.trending import baseline_for, to_now_ms

    files = event_files(settings.paths.events_dir)
    if not files:
        raise RuntimeError(f"no event Parquet under {settings.paths.events_dir}: run jobs.export_events first")
    if now is None:
        latest = latest_event_ms(files)
        if latest is None:
            latest = int(pd.read_parquet(files, columns=["timestamp"])["timestamp"].max().value // 1_000_000)
        now_ms = latest + 1
    else:
        now_ms = to_now_ms(now)
    now = pd.Timestamp(now_ms, unit="ms", tz="UTC")
    base = baseline_for(settings.trending)
    with timed("aggregate events (Ray Data)") as agg_timing:
        combined = aggregate_events(files, now_ms, settings.trending, base.horizon)
    store = ArtifactStore(settings.paths.artifacts_dir)
    previous = store.latest("trending")
    state = empty_state()
    if previous is not None and previous.file("state.parquet").exists():
        state = pd.read_parquet(previous.file("state.parquet"))
    with timed("score"):
        result = build_lists(combined, now_ms, settings.trending, read_catalogue(settings), state)
    trending = result["lists"]["global"]
    all_lists = pd.concat(
        [frame.assign(list=name, rank=np.arange(1, len(frame) + 1)) for name, frame in result["lists"].items()],
        ignore_index=True,
    ) if result["lists"] else pd.DataFrame()
    meta = {
        "now": str(now),
        "events": int(pc.sum(combined.filter(pc.not_equal(combined["kind"], LOCALE))["events"]).as_py() or 0),
        "counters": result["counters"],
        "dispersion": round(result["phi"], 3),
        "trending": len(trending),
        "lists": len(result["lists"]),
        "aggregate_seconds": agg_timing["seconds"],
        "params": settings.trending.model_dump(),
    }
    with store.publish("trending", meta) as out:
        trending.to_parquet(out / "trending.parquet")
        result["popular"].to_parquet(out / "popular.parquet")
        all_lists.to_parquet(out / "lists.parquet")
        result["state"].to_parquet(out / "state.parquet")
    version = store.latest_version("trending")
    publish_lists(settings, version, result["lists"], meta)
    log.info("top trending: %s", trending.head(5)[["track_id", "score"]].to_dict("records"))
    return {"job": "trending", "version": version, **{k: v for k, v in meta.items() if k != "params"}}


def publish_lists(settings: Settings, version: str, lists: dict[str, pd.DataFrame], meta: dict) -> None:
    """Swap the Redis lists the API serves; the artifact is already published, so a Redis
    outage fails the job loudly but loses nothing (a re-run republishes)."""
    from app.redis_server import connect
    from app.trending.lists import TrendingLists

    TrendingLists(connect(settings), settings.redis.key_prefix).publish(
        version, lists, settings.trending.ttl_s, {"now": meta["now"], "events": meta["events"]}
    )


def main() -> None:
    from jobs.common import init_ray, parse_args, print_summary

    def extra(parser):
        parser.add_argument("--now", default=None, help="Evaluation time (ISO 8601); default: latest event.")

    args, settings = parse_args(__doc__, extra)
    init_ray()
    now = pd.Timestamp(args.now) if args.now else None
    if now is not None:
        now = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
    print_summary(detect_trending(settings, now))


if __name__ == "__main__":
    main()
