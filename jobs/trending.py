"""Detect trending tracks and compute popularity; publish the `trending` artifact.

    ray job submit --working-dir . -- python -m jobs.trending --config ray_config.yaml

`now` is the time of the latest event unless given (`--now`), so a replayed or simulated
history trends as it did at its end rather than relative to the wall clock.
"""

from __future__ import annotations

import logging

import pandas as pd

from app.artifacts import ArtifactStore
from app.config import Settings
from jobs.common import event_files, timed

log = logging.getLogger(__name__)


def load_events(settings: Settings) -> pd.DataFrame:
    import ray

    files = event_files(settings.paths.events_dir)
    if not files:
        raise RuntimeError(f"no event Parquet under {settings.paths.events_dir}: run jobs.export_events first")
    ds = ray.data.read_parquet(files, columns=["track_id", "event_type", "timestamp"])
    return ds.to_pandas()


def popularity(events: pd.DataFrame, weights: dict[str, float]) -> pd.DataFrame:
    w = events["event_type"].map(weights).fillna(0.0)
    plays = w.groupby(events["track_id"]).sum()
    plays = plays[plays > 0].sort_values(ascending=False)
    return pd.DataFrame({"track_id": plays.index, "score": plays.to_numpy()})


def detect_trending(settings: Settings, now: pd.Timestamp | None = None) -> dict:
    from training.trending import trending_scores

    with timed("load events"):
        events = load_events(settings)
    now = now or events["timestamp"].max() + pd.Timedelta(milliseconds=1)
    catalog = settings.paths.world_dir / "tracks.parquet"
    # Release dates let a new track be judged against the catalogue prior, not its own silence.
    tracks = pd.read_parquet(catalog, columns=["track_id", "release_date"]) if catalog.exists() else None
    with timed("score"):
        trending = trending_scores(events, now, settings.trending, tracks=tracks)
        popular = popularity(events, dict(settings.trending.event_weights))
    store = ArtifactStore(settings.paths.artifacts_dir)
    meta = {"now": str(now), "events": len(events), "trending": len(trending), "params": settings.trending.model_dump()}
    with store.publish("trending", meta) as out:
        trending.to_parquet(out / "trending.parquet")
        popular.to_parquet(out / "popular.parquet")
    log.info("top trending: %s", trending.head(5)[["track_id", "score"]].to_dict("records"))
    return {"job": "trending", "version": store.latest_version("trending"), **meta}


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
