"""Content embeddings from audio (librosa) and metadata; publishes the `content` artifact.

    ray job submit --working-dir . -- python -m jobs.embed_content --config ray_config.yaml

Ray Data decodes and analyses the audio in a pool of actors (`content.concurrency`,
`content.batch_size`). A track whose audio cannot be decoded is logged and dead-lettered with
the reason and gets a metadata-only embedding; the job carries on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from app.artifacts import ArtifactStore
from app.config import Settings
from jobs.common import event_files, timed

log = logging.getLogger(__name__)


class AudioFeatureExtractor:
    """Ray Data callable class: numba compiles librosa's kernels once per actor, not per batch."""

    def __init__(self, sample_rate: int, max_seconds: float):
        from training import content

        self.content = content
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        features, errors = [], []
        for path in batch["audio_path"]:
            try:
                if not isinstance(path, str) or not path:
                    raise ValueError("track has no audio_path")
                y = self.content.load_audio(path, self.sample_rate, self.max_seconds)
                features.append(self.content.audio_features(y, self.sample_rate).astype(np.float32))
                errors.append(None)
            except Exception as exc:  # noqa: BLE001 - recorded per track and dead-lettered by the driver
                features.append(np.zeros(len(self.content.AUDIO_FEATURE_NAMES), dtype=np.float32))
                errors.append(f"{type(exc).__name__}: {exc}")
        return pd.DataFrame({"track_id": batch["track_id"].to_numpy(), "audio": features, "error": errors})


def artist_play_counts(settings: Settings) -> pd.Series:
    files = event_files(settings.paths.events_dir)
    if not files:
        return pd.Series(dtype="float64")
    events = pd.read_parquet(files, columns=["track_id", "event_type"])
    return events.loc[events["event_type"] == "play", "track_id"].value_counts()


def embed_content(settings: Settings, tracks_path: Path | None = None) -> dict:
    import ray

    from app.events.dead_letter import DeadLetterQueue
    from app.redis_server import connect
    from training.content import AUDIO_FEATURE_NAMES, ContentEmbedder, metadata_features

    tracks_path = tracks_path or settings.paths.world_dir / "tracks.parquet"
    tracks = pd.read_parquet(tracks_path)
    cfg = settings.content
    with timed("audio features"):
        ds = ray.data.read_parquet(str(tracks_path), columns=["track_id", "audio_path"])
        audio = ds.map_batches(
            AudioFeatureExtractor,
            fn_constructor_kwargs={"sample_rate": cfg.sample_rate, "max_seconds": cfg.analysis_seconds},
            concurrency=cfg.concurrency,
            batch_size=cfg.batch_size,
            batch_format="pandas",
            num_cpus=cfg.cpus_per_actor,
        ).to_pandas()
    audio = tracks[["track_id"]].merge(audio, on="track_id", how="left")
    failed = audio[audio["error"].notna()]
    if len(failed):
        dlq = DeadLetterQueue(connect(settings), settings.redis.dead_letter_key)
        for row in failed.itertuples():
            log.warning("audio of %s failed: %s", row.track_id, row.error)
            dlq.put("embed_content", {"track_id": row.track_id}, row.error)

    plays = artist_play_counts(settings)
    tracks["artist_popularity"] = np.log1p(
        tracks["track_id"].map(plays).fillna(0).groupby(tracks["artist_id"]).transform("sum")
    )
    meta_x, meta_names = metadata_features(tracks, list(settings.world.genres))
    audio_x = np.stack(audio["audio"].to_numpy())
    features = np.hstack([audio_x, meta_x]).astype(np.float32)
    embedder = ContentEmbedder.fit(features, dim=cfg.embedding_dim, seed=0)
    embeddings = embedder.transform(features)

    store = ArtifactStore(settings.paths.artifacts_dir)
    names = list(AUDIO_FEATURE_NAMES) + list(meta_names)
    meta = {"tracks": len(tracks), "audio_failed": int(len(failed)), "feature_names": names, "params": cfg.model_dump()}
    with store.publish("content", meta) as out:
        keep = [c for c in ("track_id", "artist_id", "genre", "genres", "explicit", "release_date") if c in tracks]
        tracks[keep].to_parquet(out / "tracks.parquet")
        pd.DataFrame(features, columns=names).assign(track_id=tracks["track_id"].to_numpy()).to_parquet(out / "features.parquet")
        np.save(out / "embeddings.npy", embeddings)
        embedder.save(out / "embedder.npz")
    summary = {"job": "embed_content", "version": store.latest_version("content"), **{k: meta[k] for k in ("tracks", "audio_failed")}}
    log.info("content embeddings: %s", summary)
    return summary


def main() -> None:
    from jobs.common import init_ray, parse_args, print_summary

    _, settings = parse_args(__doc__)
    init_ray()
    print_summary(embed_content(settings))


if __name__ == "__main__":
    main()
