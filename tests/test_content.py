"""Audio and metadata features and the content embedder, on signals synthesised in-test.

The first librosa call compiles with numba (about 20 s in a fresh environment).

    .venv/bin/pytest tests/test_content.py -q
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from training.content import (
    AUDIO_FEATURE_NAMES,
    ContentEmbedder,
    audio_features,
    estimate_key,
    load_audio,
    metadata_features,
)

SR = 22050
CHROMA = slice(AUDIO_FEATURE_NAMES.index("chroma_C_mean"), AUDIO_FEATURE_NAMES.index("chroma_C_mean") + 12)


def midi_hz(note: int) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


def tones(notes: list[int], seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (sum(np.sin(2 * np.pi * midi_hz(n) * t) for n in notes) / len(notes)).astype(np.float32)


def click_track(bpm: float, seconds: float = 10.0) -> np.ndarray:
    y = np.zeros(int(seconds * SR), dtype=np.float32)
    n = 400
    click = np.exp(-np.arange(n) / 60) * np.sin(2 * np.pi * 1000 * np.arange(n) / SR)
    for start in np.arange(0, seconds, 60.0 / bpm):
        i = int(start * SR)
        y[i : i + n] += click[: len(y) - i]
    return y


def feature(features: np.ndarray, name: str) -> float:
    return float(features[AUDIO_FEATURE_NAMES.index(name)])


def test_feature_vector_layout():
    features = audio_features(tones([60, 64, 67], 1.0), SR)
    assert features.dtype == np.float32
    assert features.shape == (len(AUDIO_FEATURE_NAMES),)
    assert len(set(AUDIO_FEATURE_NAMES)) == len(AUDIO_FEATURE_NAMES)


@pytest.mark.parametrize("bpm", [90, 120, 140])
def test_tempo_of_click_track(bpm):
    tempo = feature(audio_features(click_track(bpm), SR), "tempo_bpm")
    # Beat trackers may lock onto half or double time; anything else is wrong.
    assert min(abs(tempo - bpm * f) / (bpm * f) for f in (0.5, 1.0, 2.0)) < 0.05, tempo


def test_a_minor_triad_is_a_minor():
    features = audio_features(tones([57, 60, 64], 3.0), SR)  # A3 C4 E4
    assert estimate_key(features[CHROMA])[0] == "A minor"
    assert feature(features, "key_is_major") == 0.0


def test_c_major_scale_is_c_major():
    scale = np.concatenate([tones([note], 0.4) for note in [60, 62, 64, 65, 67, 69, 71, 72]])
    features = audio_features(scale, SR)
    assert estimate_key(features[CHROMA])[0] == "C major"
    assert feature(features, "key_is_major") == 1.0


def test_relative_keys_share_a_place_on_the_circle_of_fifths():
    a_minor = audio_features(tones([57, 60, 64], 2.0), SR)
    c_major = audio_features(tones([60, 64, 67], 2.0), SR)
    f_sharp_major = audio_features(tones([66, 70, 73], 2.0), SR)
    names = ["key_fifths_sin", "key_fifths_cos"]
    position = lambda f: np.array([feature(f, n) for n in names])  # noqa: E731
    np.testing.assert_allclose(position(a_minor), position(c_major), atol=1e-6)
    assert np.linalg.norm(position(c_major) - position(f_sharp_major)) == pytest.approx(2.0, abs=1e-6)


def test_estimate_key_on_profiles_and_flat_chroma():
    chroma = np.zeros(12)
    chroma[[9, 0, 4]] = 1.0  # A, C, E
    name, correlation = estimate_key(chroma)
    assert name == "A minor" and 0 < correlation <= 1
    assert estimate_key(np.ones(12)) == ("C major", 0.0)
    with pytest.raises(ValueError, match="12 pitch classes"):
        estimate_key(np.ones(11))


@pytest.mark.parametrize(
    "signal",
    [np.zeros(SR * 2), np.zeros(100), np.zeros(0), np.full(SR, 1e-12), np.random.default_rng(0).standard_normal(50)],
    ids=["silence", "short-silence", "empty", "near-silence", "50-samples-noise"],
)
def test_features_finite_on_silence_and_short_clips(signal):
    features = audio_features(signal.astype(np.float32), SR)
    assert np.all(np.isfinite(features))


def test_silence_has_no_tempo_or_key():
    features = audio_features(np.zeros(SR * 2, dtype=np.float32), SR)
    for name in ["tempo_bpm", "beat_strength", "key_fifths_sin", "key_fifths_cos", "key_is_major", "key_strength"]:
        assert feature(features, name) == 0.0


def test_audio_features_rejects_bad_audio():
    with pytest.raises(ValueError, match="mono"):
        audio_features(np.zeros((2, SR), dtype=np.float32), SR)
    with pytest.raises(ValueError, match="NaN"):
        audio_features(np.array([0.0, np.nan] * 2000, dtype=np.float32), SR)


def test_load_audio_downmixes_resamples_and_truncates(tmp_path):
    native = 16000
    t = np.arange(native * 3) / native
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1) * 0.5
    path = tmp_path / "clip.ogg"
    sf.write(path, stereo, native, format="OGG", subtype="VORBIS")
    y = load_audio(str(path), sr=SR, max_seconds=2.0)
    assert y.ndim == 1 and y.dtype == np.float32
    assert abs(len(y) - 2 * SR) <= 1
    # FFmpeg's stereo downmix keeps power, not amplitude: two equal channels at 0.5 sum to
    # 0.5 * 2 * 1/sqrt(2) (the -3 dB pan law)
    assert 0.6 < np.abs(y).max() < 0.8
    with pytest.raises(ValueError, match="cannot decode"):
        load_audio(str(tmp_path / "missing.ogg"), sr=SR, max_seconds=1.0)


def tracks_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "track_id": [0, 1, 2, 3],
            "genres": [["rock", "pop"], ["jazz"], [], ["pop", "polka"]],
            "release_year": [1995, 2021, None, 2010],
            "duration_ms": [180_000, 240_000, 200_000, None],
            "explicit": [True, False, False, True],
        }
    )


def test_metadata_features():
    features, names = metadata_features(tracks_frame(), genres=["rock", "pop", "jazz"])
    assert features.shape == (4, len(names)) and features.dtype == np.float32
    assert names[:3] == ["genre_rock", "genre_pop", "genre_jazz"]
    np.testing.assert_array_equal(features[:, :3], [[1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]])
    assert np.all(np.isfinite(features))
    np.testing.assert_array_equal(features[:, names.index("explicit")], [1, 0, 0, 1])
    np.testing.assert_array_equal(features[:, names.index("artist_popularity")], 0)
    # A row alone gives the same features as in its batch (no batch statistics).
    alone, _ = metadata_features(tracks_frame().iloc[[2]], genres=["rock", "pop", "jazz"])
    np.testing.assert_array_equal(alone[0], features[2])


def test_metadata_features_uses_artist_popularity_and_rejects_missing_columns():
    tracks = tracks_frame().assign(artist_popularity=[10, 20, 30, 40])
    features, names = metadata_features(tracks, genres=["rock"])
    np.testing.assert_array_equal(features[:, names.index("artist_popularity")], [10, 20, 30, 40])
    with pytest.raises(ValueError, match="duration_ms"):
        metadata_features(tracks.drop(columns="duration_ms"), genres=["rock"])


@pytest.fixture
def catalogue_features() -> np.ndarray:
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((200, 5))
    features = latent @ rng.standard_normal((5, 30)) + 0.1 * rng.standard_normal((200, 30))
    features[:, 7] = 3.0  # a constant column must not produce NaN
    return features * rng.uniform(0.1, 100, size=30)


def test_embedder_outputs_unit_norm(catalogue_features):
    embedder = ContentEmbedder.fit(catalogue_features, dim=8, seed=0)
    vectors = embedder.transform(catalogue_features)
    assert vectors.shape == (200, 8) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert embedder.explained_variance_ratio_.sum() > 0.9


def test_embedder_single_row_equals_batch_row(catalogue_features):
    embedder = ContentEmbedder.fit(catalogue_features, dim=8, seed=0)
    batch = embedder.transform(catalogue_features)
    one = embedder.transform(catalogue_features[17])
    assert one.shape == (8,)
    np.testing.assert_allclose(one, batch[17], rtol=1e-5, atol=1e-6)


def test_embedder_save_load_round_trip(catalogue_features, tmp_path):
    names = [f"f{i}" for i in range(30)]
    embedder = ContentEmbedder.fit(catalogue_features, dim=8, seed=0, sample_size=150, feature_names=names)
    path = tmp_path / "embedder.npz"
    embedder.save(path)
    loaded = ContentEmbedder.load(path)
    assert loaded.feature_names == names and loaded.dim == 8
    np.testing.assert_array_equal(loaded.transform(catalogue_features), embedder.transform(catalogue_features))


def test_embedder_is_deterministic_for_a_seed(catalogue_features):
    a = ContentEmbedder.fit(catalogue_features, dim=8, seed=3, sample_size=100)
    b = ContentEmbedder.fit(catalogue_features, dim=8, seed=3, sample_size=100)
    np.testing.assert_array_equal(a.components_, b.components_)


def test_embedder_rejects_bad_input(catalogue_features):
    with pytest.raises(ValueError, match="dim"):
        ContentEmbedder.fit(catalogue_features, dim=31, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        ContentEmbedder.fit(np.full((5, 3), np.nan), dim=2, seed=0)
    embedder = ContentEmbedder.fit(catalogue_features, dim=4, seed=0)
    with pytest.raises(ValueError, match="columns"):
        embedder.transform(catalogue_features[:, :10])


def test_embedder_on_real_features_of_synthetic_clips():
    """End to end on audio features: similar-sounding clips end up closer than different ones."""
    clips = [tones([57 + i, 60 + i, 64 + i], 1.5) for i in range(6)]
    clips += [click_track(100 + 10 * i, 3.0) for i in range(6)]
    features = np.stack([audio_features(y, SR) for y in clips])
    embedder = ContentEmbedder.fit(features, dim=4, seed=0)
    vectors = embedder.transform(features)
    similarity = vectors @ vectors.T
    within = (similarity[:6, :6].mean() + similarity[6:, 6:].mean()) / 2
    across = similarity[:6, 6:].mean()
    assert within > across


def test_fast_spectral_features_keep_librosas_definitions():
    """The artifact's feature names promise librosa's centroid, bandwidth, roll-off, ZCR, mel and
    chroma_cqt; the cached/vectorised versions must compute the same numbers."""
    import librosa

    from training.content import HOP, N_FFT, _chroma, _hann, _spectral_bases, _spectral_contrast, _spectral_shape, _stft, _zero_crossing_rate

    rng = np.random.default_rng(3)
    t = np.arange(SR * 4) / SR
    y = (sum(np.sin(2 * np.pi * midi_hz(n) * t) for n in (45, 57, 60, 64)) * 0.1 + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    y[SR : SR + 4000] = 0.0  # silent frames have centroid, bandwidth and roll-off 0 in both
    S = np.abs(_stft(y, N_FFT, HOP, _hann(N_FFT)))
    np.testing.assert_allclose(S, np.abs(librosa.stft(y, n_fft=N_FFT, hop_length=HOP)), rtol=1e-4, atol=1e-4)
    centroid, bandwidth, rolloff = _spectral_shape(S, SR)
    np.testing.assert_allclose(centroid, librosa.feature.spectral_centroid(S=S, sr=SR)[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(bandwidth, librosa.feature.spectral_bandwidth(S=S, sr=SR)[0], rtol=1e-4, atol=1e-2)
    # found block by block, the cumulative sums add in another order: a frame sitting exactly
    # on the 85% line may land one bin over, never more, and rarely
    off_by = np.abs(rolloff - librosa.feature.spectral_rolloff(S=S, sr=SR)[0]) / (SR / N_FFT)
    assert off_by.max() <= 1.0 + 1e-6 and (off_by > 0.5).mean() < 0.01
    np.testing.assert_allclose(_spectral_contrast(S, SR), librosa.feature.spectral_contrast(S=S, sr=SR, n_bands=6), atol=1e-4)
    np.testing.assert_array_equal(_zero_crossing_rate(y), librosa.feature.zero_crossing_rate(y, frame_length=N_FFT, hop_length=HOP)[0])
    np.testing.assert_allclose(
        librosa.power_to_db(_spectral_bases(SR)[2] @ S**2), librosa.power_to_db(librosa.feature.melspectrogram(S=S**2, sr=SR)), atol=1e-3
    )
    reference = librosa.feature.chroma_cqt(y=y, sr=SR, hop_length=HOP, tuning=0.0, n_octaves=6).mean(axis=1)
    np.testing.assert_allclose(_chroma(y, SR).mean(axis=1), reference, atol=0.03)


def test_concurrent_first_compiles_leave_a_cache_every_process_can_load(tmp_path):
    """A fresh pool's actors all compile librosa's kernels at once. Without the lock in
    compile_audio_kernels, two of three such pairs here left numba's cache with a mixed
    guvectorize pair, and a process loading it (the second of the pair, or any later one)
    segfaulted (exit -11)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}  # a cache nobody has written yet
    script = (
        "import sys; from pathlib import Path; import numpy as np; "
        "from training.content import audio_features, compile_audio_kernels; "
        f"compile_audio_kernels({SR}, Path(sys.argv[1])); print(audio_features(np.full({SR}, 0.1, np.float32), {SR}).shape)"
    )
    lock = str(tmp_path / "kernels.lock")
    pair = [subprocess.Popen([sys.executable, "-c", script, lock], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in pair:
        out, err = p.communicate()
        assert p.returncode == 0, err.decode()[-2000:]
        assert out.decode().strip() == f"({len(AUDIO_FEATURE_NAMES)},)"
