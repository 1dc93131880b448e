"""The content job on Ray Data, end to end on a tiny simulated catalogue with every kind of bad
input mixed in (a file that crashes its decoder too), and cold start against the artifact it
publishes; a track that kills its analysing actor, or raises, costs only itself, and a fault
in every batch fails the job rather than hanging it.

    .venv/bin/pytest tests/test_content_job.py -q
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pandas as pd
import pytest
import redis
import soundfile as sf

from app.artifacts import ArtifactStore
from app.config import settings_from_args
from app.data.audio import choose_tempo_and_key, genre_sound, synthesize_clip, write_clip
from app.data.world import generate_world, load_world
from app.events.dead_letter import DeadLetterQueue
from training.cold_start import ContentModel
from tests.crashing_extractors import DiesOnEveryBatch, FailsOnTrackT3, FailsOnTracksT3AndT5, RaisesOnTrackT3
from tests.waiting import poll

pytestmark = pytest.mark.ray

GENRES = ["rock", "classical", "electronic", "jazz"]
SR = 22050


def tone(seconds: float, sr: int, channels: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + 0.5 * np.sign(np.sin(2 * np.pi * 2 * t)))
    return np.repeat(y[:, None], channels, axis=1)


class CrashesOnOneTrack:
    """The real extractor, but its process dies on any batch holding track x-crash, as a
    decoder crashing in native code on that file would."""

    def __init__(self, sample_rate: int, max_seconds: float):
        from jobs.embed_content import AudioFeatureExtractor

        self.extractor = AudioFeatureExtractor(sample_rate, max_seconds)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if (batch["track_id"] == "x-crash").any():
            os._exit(1)
        return self.extractor(batch)


@pytest.fixture(scope="module")
def run(ray_cluster, redis_server, tmp_path_factory):
    from jobs.embed_content import embed_content

    state = tmp_path_factory.mktemp("content-state")
    settings = settings_from_args(
        {
            "redis": {"url": redis_server.url, "dead_letter_key": f"dlq:{uuid.uuid4().hex}"},
            "paths": {"state_dir": str(state)},
            "world": {"seed": 5, "n_users": 30, "n_artists": 10, "n_tracks": 32, "genres": GENRES, "clip_seconds": 2.0},
            "content": {"analysis_seconds": 2.0, "batch_size": 8, "concurrency": 2, "embedding_dim": 8, "crash_retries": 0},
        }
    )
    generate_world(settings.world, settings.paths.world_dir)
    world = load_world(settings.paths.world_dir)
    settings.paths.events_dir.mkdir(parents=True)
    world.events.to_parquet(settings.paths.events_dir / "part-0.parquet")

    bad = state / "bad"
    bad.mkdir()
    (bad / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really audio" * 20)
    (bad / "empty.ogg").write_bytes(b"")
    sf.write(bad / "silence.wav", np.zeros(SR * 2, dtype=np.float32), SR)
    sf.write(bad / "stereo_8k.ogg", tone(2.0, 8000, 2), 8000, format="OGG", subtype="VORBIS")
    sf.write(bad / "six_channels_48k.flac", tone(2.0, 48000, 6), 48000)
    sf.write(bad / "long.wav", tone(6.0, SR, 1), SR)
    extra = {
        "corrupt": bad / "corrupt.wav",
        "empty": bad / "empty.ogg",
        "silence": bad / "silence.wav",
        "missing": bad / "no-such-file.ogg",
        "stereo_8k": bad / "stereo_8k.ogg",
        "six_channels_48k": bad / "six_channels_48k.flac",
        "long": bad / "long.wav",
        "crash": bad / "long.wav",  # readable, but its decoder "crashes" (CrashesOnOneTrack)
    }
    template = world.tracks.iloc[0]
    rows = [template.to_dict() | {"track_id": f"x-{name}", "audio_path": str(path)} for name, path in extra.items()]
    rows.append(template.to_dict() | {"track_id": None})  # cannot be a track
    rows.append(template.to_dict())  # a repeated id
    catalog = pd.concat([world.tracks, pd.DataFrame(rows)], ignore_index=True)
    catalog_path = state / "catalog.parquet"
    catalog.to_parquet(catalog_path)

    summary = embed_content(settings, catalog_path, extractor=CrashesOnOneTrack)
    artifact = ArtifactStore(settings.paths.artifacts_dir).latest("content")
    return settings, world, summary, artifact


def test_every_bad_record_is_reported_with_its_reason_and_the_job_carries_on(run, redis_server):
    settings, world, summary, artifact = run
    assert summary["tracks"] == len(world.tracks) + 8
    assert summary["rejected"] == 2 and summary["audio_failed"] == 5
    # any rate, channel count and length is analysed, and so is every batch-mate of x-crash
    assert summary["audio_ok"] == len(world.tracks) + 3
    assert summary["truncated"] == 1
    failed = pd.read_parquet(artifact.file("failed.parquet")).set_index("track_id")
    assert failed.loc["x-corrupt", "reason"] == "undecodable"
    assert failed.loc["x-empty", "reason"] == "empty_audio"
    assert failed.loc["x-silence", "reason"] == "silent"
    assert failed.loc["x-missing", "reason"] == "missing_file"
    assert failed.loc["x-crash", "reason"] == "analysis_failed"
    assert sorted(failed.loc[failed["stage"] == "catalog", "reason"]) == ["duplicate_track_id", "no_track_id"]
    assert summary["failed_by_reason"] == {
        "undecodable": 1, "empty_audio": 1, "silent": 1, "missing_file": 1, "analysis_failed": 1, "no_track_id": 1,
        "duplicate_track_id": 1,
    }
    # Not the redis_client fixture: it flushes the database this module's job wrote to.
    dlq = DeadLetterQueue(redis.Redis.from_url(redis_server.url), settings.redis.dead_letter_key).entries()
    assert len(dlq) == 7 and {e["source"] for e in dlq} == {"embed_content"}
    assert any("x-silence" in e["record"] and e["reason"].startswith("silent") for e in dlq)
    assert any("x-crash" in e["record"] and e["reason"].startswith("analysis_failed") for e in dlq)


def test_artifact_manifest_and_files(run):
    settings, world, summary, artifact = run
    manifest = artifact.manifest
    assert ArtifactStore(settings.paths.artifacts_dir).verify(artifact) == []
    assert {"tracks.parquet", "features.parquet", "embeddings.npy", "embedder.npz", "failed.parquet", "artists.parquet"} <= set(manifest["files"])
    names = manifest["feature_names"]
    assert "mfcc19_std" in names and "tempo_bpm" in names and "key_fifths_sin" in names and "genre_rock" in names
    assert len(manifest["embedder"]["scaler"]["mean"]) == len(names)
    assert np.array(manifest["embedder"]["pca"]["components"]).shape == (8, len(names))
    assert manifest["counts"]["fit_sample"] == summary["audio_ok"]
    embeddings = np.load(artifact.file("embeddings.npy"))
    tracks = pd.read_parquet(artifact.file("tracks.parquet"))
    assert embeddings.shape == (len(tracks), 8)
    # Failed tracks still get a (metadata-only) embedding: nothing accepted is lost.
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    features = pd.read_parquet(artifact.file("features.parquet")).set_index("track_id")
    assert features.loc["x-long", "truncated"] and features.loc["x-long", "seconds_analysed"] == pytest.approx(2.0, abs=0.01)
    assert features.loc["x-long", "seconds_total"] == pytest.approx(6.0, abs=0.01)


def test_tempo_of_simulated_clips(run):
    _, world, _, artifact = run
    features = pd.read_parquet(artifact.file("features.parquet")).set_index("track_id")
    truth = world.tracks.set_index("track_id")["tempo_bpm"]
    estimate = features.loc[truth.index, "tempo_bpm"]
    ratio = estimate / truth
    within_octave = np.min([np.abs(ratio * f - 1) for f in (0.5, 1.0, 2.0)], axis=0) < 0.04
    assert within_octave.mean() >= 0.8, ratio.describe()


def test_cold_start_reproduces_the_batch_embedding(run):
    _, world, _, artifact = run
    model = ContentModel.from_artifact(artifact)
    embeddings = np.load(artifact.file("embeddings.npy"))
    for i in (0, 5):
        record = world.tracks.iloc[i].to_dict()
        result = model.embed_track(record | {"track_id": f"re-added-{i}"})
        assert result.audio_ok
        np.testing.assert_allclose(result.embedding, embeddings[i], atol=1e-5)
    failed = model.embed_track(world.tracks.iloc[1].to_dict() | {"track_id": "broken", "audio_path": "/nowhere.ogg"})
    assert not failed.audio_ok and failed.error_reason == "missing_file"
    np.testing.assert_allclose(np.linalg.norm(failed.embedding), 1.0, rtol=1e-5)


@pytest.mark.parametrize("genre", ["classical", "rock"])
def test_new_track_gets_neighbours_of_its_genre_from_audio_alone(run, tmp_path, genre):
    """No genre tag and an unknown artist: the neighbours come from how the clip sounds."""
    _, world, _, artifact = run
    model = ContentModel.from_artifact(artifact)
    rng = np.random.default_rng(99)
    sound = genre_sound(genre)
    tempo, tonic, mode = choose_tempo_and_key(sound, rng)
    path = tmp_path / f"new-{genre}.wav"
    write_clip(path, synthesize_clip(sound, tempo, tonic, mode, seconds=2.0, sample_rate=SR, rng=rng), SR)
    result = model.embed_track(
        {"track_id": f"new-{genre}", "audio_path": str(path), "artist_id": "never-seen", "genres": [],
         "release_year": 2024, "duration_ms": None, "explicit": False}
    )
    neighbours = [t for t, _ in model.neighbours(result.embedding, k=5)]
    genre_of = world.tracks.set_index("track_id")["genre"]
    same = sum(genre_of.get(t) == genre for t in neighbours)
    assert same >= 3, (neighbours, [genre_of.get(t) for t in neighbours])


def test_cold_start_refuses_an_artifact_whose_features_are_defined_differently(run, monkeypatch):
    """After a feature's definition changes, an old artifact's scaler/PCA would embed a new track
    unlike its catalogue: cold start says to re-run the job instead of drifting silently."""
    import training.cold_start

    _, _, _, artifact = run
    assert artifact.manifest["analysis"]["feature_version"] == training.cold_start.AUDIO_FEATURE_VERSION
    assert artifact.manifest["analysis"]["features"]["chroma"]["bins_per_octave"] == 36
    monkeypatch.setattr(training.cold_start, "AUDIO_FEATURE_VERSION", training.cold_start.AUDIO_FEATURE_VERSION + 1)
    with pytest.raises(ValueError, match="re-run jobs.embed_content"):
        ContentModel.from_artifact(artifact)


def _audio_settings(tmp_path, crash_retries: int, batch_size: int = 2):
    return settings_from_args(
        {"paths": {"state_dir": str(tmp_path)}, "content": {"batch_size": batch_size, "concurrency": 1, "crash_retries": crash_retries}}
    )


TRACKS = pd.DataFrame({"track_id": [f"t{i}" for i in range(6)], "audio_path": [f"/music/t{i}.ogg" for i in range(6)]})


@pytest.mark.timeout(180)
def test_each_pass_frees_its_cpus_when_it_ends_even_if_the_driver_seldom_collects_garbage(ray_cluster, tmp_path):
    """The job's passes run one after another in one driver, and a pass's actors hold CPUs. A
    finished pass must free them when it ends, not at the driver's next full garbage
    collection, which on a large heap may not come for minutes: the next pass waited for
    those CPUs, and the job hung (the crash tests below did, run after the end-to-end suite).
    Automatic collection is off here, as it in effect is on such a driver."""
    import gc

    import ray

    from jobs.embed_content import extract_audio

    def free_cpus() -> float:
        time.sleep(0.05)  # an actor's exit takes the GCS and raylet a moment: look every 50 ms
        return ray.available_resources().get("CPU", 0.0)

    # An earlier test's work may still be on its way out (a CPU was seen held for under 5 s
    # here): wait up to 10 s for it, then compare against whatever is free.
    before = poll(free_cpus, lambda cpus: cpus >= ray.cluster_resources()["CPU"], 200)
    gc.disable()
    try:
        # Two passes: t3's batch fails the first, and t2 and t3 go again alone. A failed batch
        # is what left a pool's actors behind: a pass where every batch succeeded let them go.
        analysis = extract_audio(_audio_settings(tmp_path, crash_retries=0), TRACKS[:4], extractor=RaisesOnTrackT3)
        after = poll(free_cpus, lambda cpus: cpus >= before, 1200)  # up to a minute
    finally:
        gc.enable()
    assert analysis.set_index("track_id").loc["t3", "error_reason"] == "analysis_failed"
    assert after >= before


# The failure this guards against was a job that never ended.
@pytest.mark.timeout(180)
@pytest.mark.parametrize("extractor", [FailsOnTrackT3, RaisesOnTrackT3], ids=["actor-dies", "raises"])
def test_a_track_that_fails_its_batch_every_time_costs_only_itself(ray_cluster, tmp_path, extractor):
    from jobs.embed_content import extract_audio

    analysis = extract_audio(_audio_settings(tmp_path, crash_retries=0), TRACKS, extractor=extractor).set_index("track_id")
    assert sorted(analysis.index) == sorted(TRACKS["track_id"])  # t2, in t3's batch, analysed too
    assert analysis.loc["t3", "error_reason"] == "analysis_failed"
    assert "/music/t3.ogg" in analysis.loc["t3", "error"]
    assert analysis.drop(index="t3")["error_reason"].isna().all()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "batch_size, extractor, culprits",
    [(8, FailsOnTrackT3, ["t3"]), (4, FailsOnTracksT3AndT5, ["t3", "t5"])],
    ids=["one-batch-catalogue", "a-culprit-in-every-batch"],
)
def test_every_batch_failing_on_a_bad_file_still_costs_only_the_bad_files(ray_cluster, tmp_path, batch_size, extractor, culprits):
    """Every batch of the first pass fails, yet each because of one file: a catalogue that
    fits in one batch, or a bad file in each batch. The other tracks are analysed."""
    from jobs.embed_content import extract_audio

    settings = _audio_settings(tmp_path, crash_retries=0, batch_size=batch_size)
    analysis = extract_audio(settings, TRACKS, extractor=extractor).set_index("track_id")
    assert sorted(analysis.index) == sorted(TRACKS["track_id"])
    assert sorted(analysis.index[analysis["error_reason"] == "analysis_failed"]) == culprits
    assert analysis.drop(index=culprits)["error_reason"].isna().all()


@pytest.mark.timeout(180)
def test_a_fault_in_every_batch_fails_the_job_instead_of_retrying_each_track(ray_cluster, tmp_path):
    from jobs.embed_content import extract_audio

    with pytest.raises(RuntimeError, match="every batch of audio analysis failed"):
        extract_audio(_audio_settings(tmp_path, crash_retries=0), TRACKS[:4], extractor=DiesOnEveryBatch)  # two batches
