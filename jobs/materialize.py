"""Materialise the published artifacts into the online feature store.

    ray job submit --working-dir . -- python -m jobs.materialize --config ray_config.yaml

Steps: validate the feature repo against the registry published last time (an incompatible
change is refused) → build each view's rows from the latest artifacts and the exported events
→ write an offline snapshot per view (point-in-time retrieval, parity) → write to Redis with
Ray Data writer tasks at bounded concurrency under a fresh namespace → switch the alias in one
SET → let the previous namespace expire after a grace period. Readers follow the alias, so
they see the old namespace until the switch and the new one after it, never a mix.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import redis

from app.artifacts import ArtifactStore, new_version
from app.config import Settings
from app.features.offline import OfflineSnapshots
from app.features.registry import FeatureView, Registry, RegistryError, check_compatible, load_registry
from app.features.store import Published, RedisOnlineStore
from app.keys import Keys
from app.models import release_ms
from app.redis_server import client_from_url, connect, resolve_redis_url
from jobs.common import dataset_in_blocks, event_files, timed

log = logging.getLogger(__name__)


# Pipelines of `features.write_batch_size` rows per writer task: one connect per this many.
WRITES_PER_TASK = 10


def write_rows(block: pd.DataFrame, redis_url: str, key_prefix: str, namespace: str, view_json: str, write_batch: int) -> pd.DataFrame:
    """Ray Data task: one block of a view's rows into Redis, in pipelines of `write_batch`
    rows, on a connection of its own; returns how many rows it wrote.

    A task, not an actor pool: Ray Data starts an actor pool's processes for every dataset.
    Materialising the benchmark world's two views (400 users, 800 tracks, 2 cores) took 6-9 s
    with a pool of writer actors against 0.9-1.2 s in tasks on the cluster's warm workers."""
    client = client_from_url(redis_url)
    try:
        view = FeatureView.model_validate_json(view_json)
        fields = [f for f in view.fields if f in block]
        rows = zip(block["entity_id"], block[fields].to_dict("records"))
        return pd.DataFrame({"written": [RedisOnlineStore(client, Keys(key_prefix), write_batch=write_batch).write(namespace, view, rows)]})
    finally:
        client.close()


def user_history(
    events: pd.DataFrame, tracks: pd.DataFrame | None, recent_n: int, heard_days: float = 30.0,
    event_weights: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Per user: latest distinct positive tracks, every track with any event and the weight CF
    training gives it (`event_weights` summed, as jobs/train_cf.py sums them: serving's fold-in
    must solve what training solved), the tracks heard within `heard_days` of the data's end,
    top genres."""
    events = events.sort_values("timestamp")
    positive = events[events["event_type"].isin(["play", "like"])]
    recent = (
        positive.drop_duplicates(["user_id", "track_id"], keep="last")
        .groupby("user_id")["track_id"]
        .agg(lambda s: s.iloc[::-1].head(recent_n).tolist())
    )
    weight = events["event_type"].map(event_weights or {"play": 1.0, "like": 1.0}).fillna(0.0).astype("float32")
    per_track = events.assign(weight=weight).groupby(["user_id", "track_id"])["weight"].sum().reset_index()  # tracks sorted
    by_user = per_track.groupby("user_id")
    seen, seen_weights = by_user["track_id"].agg(list), by_user["weight"].agg(lambda w: w.to_numpy(dtype=np.float32))
    cutoff = events["timestamp"].max() - pd.Timedelta(days=heard_days)
    heard = events[events["timestamp"] >= cutoff].groupby("user_id")["track_id"].agg(lambda s: sorted(set(s)))
    out = pd.DataFrame({"recent_tracks": recent, "seen_tracks": seen, "seen_weights": seen_weights, "heard_recently": heard})
    out["heard_recently"] = out["heard_recently"].apply(lambda v: v if isinstance(v, list) else [])
    out["n_plays"] = positive.groupby("user_id").size().reindex(out.index).fillna(0).astype(int)
    if tracks is not None:
        genre = positive["track_id"].map(tracks.set_index("track_id")["genre"])
        top = positive.assign(genre=genre).groupby(["user_id", "genre"]).size().sort_values(ascending=False)
        out["top_genres"] = top.reset_index().groupby("user_id")["genre"].agg(lambda s: s.head(3).tolist())
    out["recent_tracks"] = out["recent_tracks"].apply(lambda v: v if isinstance(v, list) else [])
    return out


def build_views(settings: Settings, store: ArtifactStore) -> tuple[dict[str, pd.DataFrame], dict, pd.Timestamp | None]:
    """Rows of each view (index: entity id), the artifact versions used, and the data cut-off."""
    content = store.latest("content")
    cf = store.latest("cf")
    trending = store.latest("trending")
    tracks = pd.read_parquet(content.file("tracks.parquet")) if content else None
    files = event_files(settings.paths.events_dir)
    events = pd.read_parquet(files, columns=["user_id", "track_id", "event_type", "timestamp"]) if files else None

    users = (
        user_history(events, tracks, settings.serving.recent_plays, settings.serving.heard_filter_days, settings.cf.event_weights)
        if events is not None
        else pd.DataFrame()
    )
    if cf is not None:
        ids = pd.read_parquet(cf.file("users.parquet"))["user_id"].to_numpy()
        users = users.join(pd.Series(list(np.load(cf.file("user_factors.npy"))), index=ids, name="cf_vector"), how="outer")

    views = {"user_profile": users}
    if tracks is not None:
        t = tracks.set_index("track_id")
        track_rows = pd.DataFrame(index=t.index)
        for col in ("artist_id", "genre", "explicit"):
            if col in t:
                track_rows[col] = t[col]
        if "release_date" in t:
            track_rows["release_ms"] = release_ms(t["release_date"])
        track_rows["embedding"] = list(np.load(content.file("embeddings.npy")))
        if trending is not None:
            plays = pd.read_parquet(trending.file("popular.parquet")).set_index("track_id")["score"]
            track_rows["plays"] = plays.reindex(track_rows.index).fillna(0.0)
        views["track_profile"] = track_rows
    versions = {a.name: a.version for a in (content, cf, trending) if a is not None}
    as_of = events["timestamp"].max() if events is not None else None
    return views, versions, as_of


def write_online(settings: Settings, namespace: str, view: FeatureView, rows: pd.DataFrame) -> int:
    """Write one view with Ray Data; at most `features.write_concurrency` writers hit Redis."""
    frame = rows[[c for c in view.fields if c in rows]].rename_axis("entity_id").reset_index()
    frame["entity_id"] = frame["entity_id"].astype(str)
    if frame.empty:
        return 0
    cfg = settings.features
    # Blocks enough for every writer as soon as a view has more rows than one task writes.
    ds = dataset_in_blocks(frame, cfg.write_batch_size * WRITES_PER_TASK)
    written = (
        ds.map_batches(
            write_rows,
            fn_kwargs={
                "redis_url": resolve_redis_url(settings),
                "key_prefix": settings.redis.key_prefix,
                "namespace": namespace,
                "view_json": view.model_dump_json(),
                "write_batch": cfg.write_batch_size,
            },
            concurrency=min(cfg.write_concurrency, ds.num_blocks()),
            batch_size=None,  # the whole block
            batch_format="pandas",
            num_cpus=0.25,
        )
        # Summed here: Dataset.sum runs an aggregation stage of its own, 2.5-6 s even for the
        # few rows of counts this returns.
        .to_pandas()["written"]
    )
    return int(written.sum())


def check_registry(settings: Settings, offline: OfflineSnapshots) -> Registry:
    registry = load_registry(settings.features.repo_dir)
    published = offline.published_registry()
    if published is not None:
        problems = check_compatible(published, registry)
        if problems:
            raise RegistryError("refusing to materialise an incompatible feature repo: " + "; ".join(problems))
    return registry


def shared_rankings(trending: pd.DataFrame, popular: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The lists every listener shares, as the blend reads them: trending ranked as /v1/trending
    ranks it, by the score smoothed across runs (`rank_score`; an artifact from before it had
    only `score`), popular by its play weight."""
    rank = "rank_score" if "rank_score" in trending else "score"
    return {
        "trending": dict(zip(trending["track_id"], trending[rank].astype(float))),
        "popular": dict(zip(popular["track_id"], popular["score"].astype(float))),
    }


def _write_namespace(settings: Settings, store: ArtifactStore, online, offline: OfflineSnapshots, registry, namespace: str) -> dict:
    """Every view and shared ranking into `namespace`, online and offline; returns its meta."""
    with timed("build views"):
        views, versions, as_of = build_views(settings, store)
    counts = {}
    for name, rows in views.items():
        view = registry[name]
        offline.write(namespace, view, rows, as_of)
        with timed(f"write {name}"):
            counts[name] = write_online(settings, namespace, view, rows)

    trending = store.latest("trending")
    if trending is not None:
        ttl = registry["track_profile"].ttl_s if "track_profile" in registry.views else 2 * 24 * 3600
        t = pd.read_parquet(trending.file("trending.parquet"))
        rankings = shared_rankings(t, pd.read_parquet(trending.file("popular.parquet")))
        for name, scores in rankings.items():
            online.write_ranking(namespace, name, scores, ttl)
        counts["trending"] = len(t)

    meta = {"as_of": str(as_of) if as_of is not None else None, "artifacts": versions, "counts": counts}
    offline.finish(namespace, registry, meta)
    return meta


def materialize(settings: Settings) -> dict:
    store = ArtifactStore(settings.paths.artifacts_dir)
    online = RedisOnlineStore(connect(settings), Keys(settings.redis.key_prefix), settings.features.write_batch_size)
    offline = OfflineSnapshots(settings.paths.features_dir)
    registry = check_registry(settings, offline)
    namespace = new_version()
    try:
        meta = _write_namespace(settings, store, online, offline, registry, namespace)
    except Exception:
        # Nobody reads a namespace before it is published: without this a failed run's partial
        # one would hold Redis memory for its whole TTL (30 days for user_profile).
        try:
            n = online.expire_namespace(namespace, 0)
            log.warning("materialisation failed; its unpublished namespace %s (%d keys) was removed", namespace, n)
        except redis.RedisError as exc:  # Redis itself may be why: the keys then expire with their TTL
            log.warning("materialisation failed and its namespace %s could not be removed: %s", namespace, exc)
        raise
    previous = online.publish(Published(namespace, registry, meta))
    if previous is not None and previous != namespace:
        n = online.expire_namespace(previous, settings.features.old_namespace_grace_s)
        log.info("previous namespace %s: %d keys expire in %ds", previous, n, settings.features.old_namespace_grace_s)
    return {"job": "materialize", "namespace": namespace, "users": meta["counts"].get("user_profile", 0), **meta}


def main() -> None:
    from jobs.common import init_ray, parse_args, print_summary

    _, settings = parse_args(__doc__)
    init_ray()
    print_summary(materialize(settings))


if __name__ == "__main__":
    main()
