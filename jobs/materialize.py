"""Load the published artifacts into the online feature store under a new namespace, then
switch the alias to it.

    ray job submit --working-dir . -- python -m jobs.materialize --config ray_config.yaml

Readers follow the alias, so they see the previous namespace until the switch and the new one
after it, never a mix. The previous namespace is left to expire shortly after the switch.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from app.artifacts import ArtifactStore, new_version
from app.config import Settings
from app.features.store import RedisOnlineStore
from app.features.views import USER_PROFILE
from app.keys import Keys
from app.redis_server import connect
from jobs.common import event_files, timed

log = logging.getLogger(__name__)

OLD_NAMESPACE_GRACE_S = 600


def user_history(events: pd.DataFrame, tracks: pd.DataFrame | None, recent_n: int) -> pd.DataFrame:
    """Per user: latest distinct positive tracks, every track with any event, top genres."""
    events = events.sort_values("timestamp")
    positive = events[events["event_type"].isin(["play", "like"])]
    recent = (
        positive.drop_duplicates(["user_id", "track_id"], keep="last")
        .groupby("user_id")["track_id"]
        .agg(lambda s: s.iloc[::-1].head(recent_n).tolist())
    )
    seen = events.groupby("user_id")["track_id"].agg(lambda s: sorted(set(s)))
    out = pd.DataFrame({"recent_tracks": recent, "seen_tracks": seen})
    out["n_plays"] = positive.groupby("user_id").size().reindex(out.index).fillna(0).astype(int)
    if tracks is not None:
        genre = positive["track_id"].map(tracks.set_index("track_id")["genre"])
        top = positive.assign(genre=genre).groupby(["user_id", "genre"]).size().sort_values(ascending=False)
        out["top_genres"] = top.reset_index().groupby("user_id")["genre"].agg(lambda s: s.head(3).tolist())
    out["recent_tracks"] = out["recent_tracks"].apply(lambda v: v if isinstance(v, list) else [])
    return out


def materialize(settings: Settings) -> dict:
    store = ArtifactStore(settings.paths.artifacts_dir)
    client = connect(settings)
    keys = Keys(settings.redis.key_prefix)
    online = RedisOnlineStore(client, keys)
    namespace = new_version()

    content = store.latest("content")
    tracks = pd.read_parquet(content.file("tracks.parquet")) if content else None
    files = event_files(settings.paths.events_dir)
    events = pd.read_parquet(files, columns=["user_id", "track_id", "event_type", "timestamp"]) if files else None
    profiles = user_history(events, tracks, settings.serving.recent_plays) if events is not None else pd.DataFrame()

    cf = store.latest("cf")
    if cf is not None:
        users = pd.read_parquet(cf.file("users.parquet"))["user_id"]
        factors = np.load(cf.file("user_factors.npy"))
        vectors = pd.Series(list(factors), index=users.to_numpy())
        profiles = profiles.join(vectors.rename("cf_vector"), how="outer")

    with timed("write user profiles"):
        rows = ((uid, {k: v for k, v in row.items() if not _missing(v)}) for uid, row in profiles.to_dict("index").items())
        n_users = online.write(namespace, USER_PROFILE, rows)
    trending = store.latest("trending")
    n_trending = 0
    if trending is not None:
        ttl = 2 * 24 * 3600
        t = pd.read_parquet(trending.file("trending.parquet"))
        p = pd.read_parquet(trending.file("popular.parquet"))
        online.write_ranking(namespace, "trending", dict(zip(t["track_id"], t["score"].astype(float))), ttl)
        online.write_ranking(namespace, "popular", dict(zip(p["track_id"], p["score"].astype(float))), ttl)
        n_trending = len(t)

    previous = online.current_namespace()
    online.set_current_namespace(namespace)
    if previous and previous != namespace:
        expired = 0
        for key in client.scan_iter(match=keys.namespace_pattern(previous), count=1000):
            client.expire(key, OLD_NAMESPACE_GRACE_S)
            expired += 1
        log.info("previous namespace %s: %d keys expire in %ds", previous, expired, OLD_NAMESPACE_GRACE_S)
    versions = {n: store.latest_version(n) for n in ("cf", "content", "trending")}
    return {"job": "materialize", "namespace": namespace, "users": n_users, "trending": n_trending, "from": versions}


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def main() -> None:
    from jobs.common import parse_args, print_summary

    _, settings = parse_args(__doc__)
    print_summary(materialize(settings))


if __name__ == "__main__":
    main()
