"""Content embeddings from audio (librosa) and metadata; publishes the `content` artifact.

    ray job submit --working-dir . -- python -m jobs.embed_content --config ray_config.yaml
    python -m jobs.embed_content --config ray_config.yaml --catalog /tmp/warzone.parquet

Reads a track catalogue (`content.catalog_path`, by default the simulated world's
tracks.parquet; see app/data/audio_catalog.py for the columns), decodes and analyses the audio
in a pool of Ray Data actors (`content.concurrency`, `content.batch_size`,
`content.analysis_seconds`), joins metadata and artist popularity from the exported events,
fits scaler + PCA on a sample and embeds every track.

Nothing is dropped: a track whose audio fails (missing, empty, corrupt, silent, or crashing
its decoder: see `extract_audio`) is listed in the artifact's failed.parquet and, by the
first run that meets it, the dead-letter stream with its reason, and still gets a
metadata-only embedding; a catalogue row that cannot be a track (no id, repeated id) is
dead-lettered too. The summary, logged and printed last, counts both.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from app.artifacts import ArtifactStore, sha256_file
from app.config import Settings
from jobs.common import dataset_in_blocks, event_files, timed

log = logging.getLogger(__name__)

FAILED_COLUMNS = ["track_id", "audio_path", "stage", "reason", "error"]


class AudioFeatureExtractor:
    """Ray Data callable class: numba compiles (or loads) librosa's kernels once per actor, one
    actor of a machine at a time (`compile_audio_kernels`: concurrent compiles can corrupt
    numba's cache)."""

    def __init__(self, sample_rate: int, max_seconds: float):
        from training.content import analyse_tracks, compile_audio_kernels

        compile_audio_kernels(sample_rate, Path(tempfile.gettempdir()) / "echotune-audio-kernels.lock")
        self.analyse = analyse_tracks
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.analyse(batch, self.sample_rate, self.max_seconds)


def artist_popularity(settings: Settings, tracks: pd.DataFrame) -> dict[str, float]:
    """log(1 + plays of the artist's tracks) from the exported events; empty without events."""
    files = event_files(settings.paths.events_dir)
    if not files:
        return {}
    events = pd.read_parquet(files, columns=["track_id", "event_type"])
    plays = events.loc[events["event_type"] == "play", "track_id"].value_counts()
    per_track = tracks["track_id"].map(plays).fillna(0.0)
    return np.log1p(per_track.groupby(tracks["artist_id"]).sum()).to_dict()


def track_blocks(tracks: pd.DataFrame, batch_size: int):
    """A dataset of (track_id, audio_path) in blocks of about `batch_size` rows, so every actor
    of the pool gets work."""
    return dataset_in_blocks(tracks[["track_id", "audio_path"]], batch_size)


def extract_audio(settings: Settings, tracks: pd.DataFrame, extractor: type = AudioFeatureExtractor) -> pd.DataFrame:
    """`extractor` (`analyse_tracks` rows) for every catalogue track, computed by a Ray Data
    actor pool.

    A track whose decoder crashes in native code kills its actor and, with it, its whole
    batch; no `try` inside the batch can catch that (nor does `analyse_tracks` catch every
    exception a decoder might raise). Such a batch is retried on the restarted actor
    `content.crash_retries` times and then dropped; its tracks are analysed again one per
    batch, which isolates the culprit: a track that still fails alone gets an
    `analysis_failed` row, to be dead-lettered like any bad audio, and the rest of its batch
    is analysed. If every batch of the first pass failed, each may hold a bad file (a
    catalogue of one batch with one, say) or nothing can be analysed at all (a broken install,
    where every track would crash alone too). The first batch's tracks, analysed alone, tell
    which: if none of them gets through either, the job fails rather than crash once per
    track of the catalogue; otherwise the rest follow one per batch."""
    from training.content import ANALYSIS_COLUMNS, unanalysed

    cfg = settings.content
    analysed = _analyse(settings, tracks, extractor, alone=False)
    lost = tracks[~tracks["track_id"].isin(analysed["track_id"])]
    if lost.empty:
        return analysed
    log.warning("%d tracks were in failed batches; analysing them one per batch to find the culprits", len(lost))
    if len(lost) == len(tracks):
        # With batch_size 1 the first pass already analysed every track alone.
        probe = lost.iloc[: cfg.batch_size] if cfg.batch_size > 1 else lost
        again = _analyse(settings, probe, extractor, alone=True) if cfg.batch_size > 1 else analysed
        if again.empty:
            raise RuntimeError(
                f"every batch of audio analysis failed ({len(tracks)} tracks), and so did each of {len(probe)} tracks "
                "analysed alone: the fault is not one track's audio; the job log has each batch's error"
            )
        rest = lost.iloc[len(probe) :]
        if not rest.empty:
            again = pd.concat([again, _analyse(settings, rest, extractor, alone=True)], ignore_index=True)
    else:
        again = _analyse(settings, lost, extractor, alone=True)
    crashed = lost[~lost["track_id"].isin(again["track_id"])]
    for track_id, path in zip(crashed["track_id"], crashed["audio_path"]):
        log.warning("track %s failed its analysis alone in its batch: %s", track_id, path)
    detail = "its analysis failed alone in its batch (its process died, or it raised; see the job log)"
    crashed_rows = pd.DataFrame(
        [unanalysed(t) | {"error_reason": "analysis_failed", "error": f"audio {path}: {detail}"}
         for t, path in zip(crashed["track_id"], crashed["audio_path"])],
        columns=ANALYSIS_COLUMNS,
    )
    return pd.concat([analysed, again, crashed_rows], ignore_index=True)


def _analyse(settings: Settings, tracks: pd.DataFrame, extractor: type, alone: bool) -> pd.DataFrame:
    """One pass of the actor pool, in batches of `content.batch_size` or, `alone`, of one
    track. The rows of a batch that failed (its actor died on every try, or it raised) are
    missing from the result; Ray Data logs each with its error.

    Alone, an actor holds one batch at a time: a batch queued behind the culprit on the actor
    it killed would fail with it, and be reported as a culprit itself."""
    import ray
    from ray.data import DataContext

    cfg = settings.content
    batch_size = 1 if alone else cfg.batch_size
    DataContext.get_current().enable_progress_bars = True  # the operator progress lines in the job log
    ds = track_blocks(tracks, batch_size).map_batches(
        extractor,
        fn_constructor_kwargs={"sample_rate": cfg.sample_rate, "max_seconds": cfg.analysis_seconds},
        # Ray 2.51+ deprecates `concurrency=` for a fixed pool in favour of this.
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency, max_tasks_in_flight_per_actor=1 if alone else None),
        batch_size=batch_size,
        batch_format="pandas",
        num_cpus=cfg.cpus_per_actor,
        # A dead actor comes back (Ray Data's default), and its batch is retried a bounded number
        # of times, not for ever (the default: that hung the job on a batch that killed its actor
        # every time), and then dropped without failing the job (max_errored_blocks). Ray 2.60
        # has no named parameter for this, hence its deprecation warning on `ray_remote_args`.
        max_task_retries=cfg.crash_retries,
    )
    ds.context.max_errored_blocks = -1
    analysed = ds.to_pandas()
    # Give the pool's CPUs back now. Ray Data lets a finished pool's actors go by dropping its
    # references to them, but after a failed batch its operator still holds them in a reference
    # cycle (a task's done callback is a partial over its actor), so they live on, each holding
    # its `content.cpus_per_actor`, until the driver's next full collection, which on a large
    # heap may not come for minutes. The next pass's actors then waited for those CPUs: the job
    # hung (tests/test_content_job.py, the test on freeing CPUs).
    del ds
    gc.collect()
    return analysed if "track_id" in analysed else pd.DataFrame({"track_id": []})  # no batch made it


def _dead_letter(settings: Settings, failed: pd.DataFrame) -> None:
    if failed.empty:
        return
    from app.events.dead_letter import DeadLetterQueue
    from app.redis_server import connect

    for row in failed.itertuples(index=False):
        log.warning("track %s %s failed: %s", row.track_id, row.stage, row.error)
    # Every run analyses the whole catalogue: tracks dead-lettered by an earlier run are not again.
    written = DeadLetterQueue(connect(settings), settings.redis.dead_letter_key).put_many("embed_content", (
        ({"track_id": row.track_id, "audio_path": row.audio_path, "stage": row.stage}, f"{row.reason}: {row.error}")
        for row in failed.itertuples(index=False)
    ), once=True)
    log.warning("%d tracks failed; %d newly dead-lettered, the rest were by an earlier run", len(failed), written)


def embed_content(settings: Settings, tracks_path: Path | None = None, extractor: type = AudioFeatureExtractor) -> dict:
    from app.data.audio_catalog import normalise_catalog
    from training.content import (
        AUDIO_FEATURE_DEFINITION,
        AUDIO_FEATURE_NAMES,
        AUDIO_FEATURE_VERSION,
        ContentEmbedder,
        content_features,
        fill_missing_audio,
        genre_vocabulary,
    )

    cfg = settings.content
    started = time.perf_counter()
    tracks_path = Path(tracks_path or cfg.catalog_path or settings.paths.world_dir / "tracks.parquet").expanduser()
    tracks, rejected = normalise_catalog(pd.read_parquet(tracks_path))
    log.info("catalogue %s: %d tracks, %d rows rejected", tracks_path, len(tracks), len(rejected))
    if tracks.empty:
        raise ValueError(f"catalogue {tracks_path} has no usable tracks ({len(rejected)} rows rejected)")

    with timed("audio features") as audio_timing:
        analysis = extract_audio(settings, tracks, extractor)
    popularity = artist_popularity(settings, tracks)
    genres = genre_vocabulary(tracks["genres"])
    features, names, audio_ok = content_features(tracks, analysis, genres, popularity)
    if not audio_ok.any():
        raise ValueError(f"no track of {tracks_path} has analysable audio; see the failed items")
    embedder = ContentEmbedder.fit(
        features[audio_ok], dim=cfg.embedding_dim, seed=0, sample_size=cfg.fit_sample_size, feature_names=names
    )
    embeddings = embedder.transform(fill_missing_audio(features, audio_ok, embedder))

    analysis = tracks[["track_id", "audio_path"]].merge(analysis, on="track_id", how="left")
    audio_failed = analysis[analysis["error_reason"].notna()]
    failed = pd.concat(
        [
            pd.DataFrame(
                {"track_id": audio_failed["track_id"], "audio_path": audio_failed["audio_path"], "stage": "audio",
                 "reason": audio_failed["error_reason"], "error": audio_failed["error"]}
            ),
            pd.DataFrame(
                {"track_id": rejected["track_id"].map(lambda t: None if pd.isna(t) else str(t)), "audio_path": None, "stage": "catalog",
                 "reason": rejected["reason"], "error": "catalogue row rejected: " + rejected["reason"]}
            ),
        ],
        ignore_index=True,
    )[FAILED_COLUMNS]
    _dead_letter(settings, failed)

    seconds = audio_timing["seconds"]
    counts = {
        "catalog_rows": int(len(tracks) + len(rejected)),
        "tracks": int(len(tracks)),
        "audio_ok": int(audio_ok.sum()),
        "audio_failed": int(len(audio_failed)),
        "rejected": int(len(rejected)),
        "truncated": int(analysis["truncated"].fillna(False).astype(bool).sum()),
        "fit_sample": int(min(cfg.fit_sample_size, int(audio_ok.sum()))),
    }
    meta = {
        "catalog": {"path": str(tracks_path), "sha256": sha256_file(tracks_path)},
        "counts": counts,
        "failed_by_reason": failed["reason"].value_counts().to_dict(),
        "feature_names": names,
        "n_audio_features": len(AUDIO_FEATURE_NAMES),
        "genre_vocabulary": genres,
        "analysis": {
            "sample_rate": cfg.sample_rate,
            "max_seconds": cfg.analysis_seconds,
            "feature_version": AUDIO_FEATURE_VERSION,
            "features": AUDIO_FEATURE_DEFINITION,
        },
        "embedder": {**embedder.params(), "seed": 0, "fit_rows": counts["fit_sample"]},
        "params": cfg.model_dump(mode="json"),
        # kept flat for callers of the earlier manifest
        "tracks": counts["tracks"],
        "audio_failed": counts["audio_failed"],
    }
    store = ArtifactStore(settings.paths.artifacts_dir)
    with store.publish("content", meta) as out:
        keep = [c for c in ("track_id", "artist_id", "album", "title", "genre", "genres", "explicit", "release_year", "release_date") if c in tracks]
        tracks[keep].to_parquet(out / "tracks.parquet")
        # tempo_bpm and key_strength are feature columns already; the key's name is not.
        described = analysis[["track_id", "key", "seconds_total", "seconds_analysed", "truncated"]].rename(columns={"key": "key_estimate"})
        pd.DataFrame(features, columns=names).assign(
            track_id=tracks["track_id"].to_numpy(), audio_ok=audio_ok
        ).merge(described, on="track_id").to_parquet(out / "features.parquet")
        np.save(out / "embeddings.npy", embeddings)
        embedder.save(out / "embedder.npz")
        failed.to_parquet(out / "failed.parquet")
        pd.DataFrame({"artist_id": list(popularity), "artist_popularity": list(popularity.values())}).to_parquet(
            out / "artists.parquet"
        )
    summary = {
        "job": "embed_content",
        "version": store.latest_version("content"),
        **counts,
        "failed_by_reason": meta["failed_by_reason"],
        "audio_seconds": seconds,
        "tracks_per_s": round(len(tracks) / seconds, 2) if seconds else None,
        "explained_variance": round(float(embedder.explained_variance_ratio_.sum()), 3),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("content embeddings: %s", summary)
    return summary


def main() -> None:
    from jobs.common import init_ray, parse_args, print_summary

    args, settings = parse_args(
        __doc__, lambda p: p.add_argument("--catalog", type=Path, default=None, help="Catalogue Parquet (overrides content.catalog_path).")
    )
    init_ray()
    print_summary(embed_content(settings, args.catalog))


if __name__ == "__main__":
    main()
