"""Content embeddings from audio and metadata: what lets a track nobody has played yet get
recommended (cold start) and what "more like this" means when listening data is thin.

Pure functions plus one small fitted transform, so that a Ray Data stage can wrap them:
`load_audio` -> `audio_features` per track, `metadata_features` per batch, then
`ContentEmbedder.fit` once on the catalogue and `transform` everywhere (one row at request time).

    y = load_audio(path, sr=settings.sample_rate, max_seconds=settings.analysis_seconds)
    audio = audio_features(y, settings.sample_rate)
    meta, meta_names = metadata_features(tracks, genres=world.genres)
    embedder = ContentEmbedder.fit(np.hstack([audio_matrix, meta]), dim=settings.embedding_dim, seed=0)
    vectors = embedder.transform(features)          # unit-norm float32

The first librosa call in a fresh environment compiles with numba (about 20 s).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import soundfile as sf
from sklearn.decomposition import PCA

log = logging.getLogger(__name__)

N_FFT = 2048
HOP = 512
N_MFCC = 20
N_CONTRAST_BANDS = 6  # librosa returns n_bands + 1 rows

PITCH_CLASSES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]

# Krumhansl-Kessler key profiles (probe-tone ratings), tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])

AUDIO_FEATURE_NAMES: list[str] = (
    [f"mfcc{i}_mean" for i in range(N_MFCC)]
    + [f"mfcc{i}_std" for i in range(N_MFCC)]
    + [f"chroma_{pc}_mean" for pc in PITCH_CLASSES]
    + [
        "spectral_centroid_mean",
        "spectral_centroid_std",
        "spectral_bandwidth_mean",
        "spectral_bandwidth_std",
        "spectral_rolloff_mean",
        "spectral_rolloff_std",
    ]
    + [f"spectral_contrast{i}_mean" for i in range(N_CONTRAST_BANDS + 1)]
    + ["zcr_mean", "rms_mean", "rms_std", "tempo_bpm", "beat_strength"]
    + ["key_fifths_sin", "key_fifths_cos", "key_is_major", "key_strength"]
)
"""Order of the columns `audio_features` returns; saved with every embedder."""


def _key_templates() -> tuple[np.ndarray, list[str]]:
    """24 standardised profiles (12 major, 12 minor) so one matrix product gives all correlations."""
    templates, names = [], []
    for mode, profile in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
        for tonic in range(12):
            templates.append(np.roll(profile, tonic))
            names.append(f"{PITCH_CLASSES[tonic]} {mode}")
    t = np.array(templates)
    t = (t - t.mean(axis=1, keepdims=True)) / t.std(axis=1, keepdims=True)
    return t, names


_KEY_TEMPLATES, _KEY_NAMES = _key_templates()


def estimate_key(chroma_mean: np.ndarray) -> tuple[str, float]:
    """Krumhansl-Schmuckler: the key whose profile correlates best with the mean chroma.

    A flat (or all-zero) chroma has no tonal centre; it returns ("C major", 0.0) so callers can
    treat correlation 0 as "no key" without a special case.
    """
    chroma = np.asarray(chroma_mean, dtype=np.float64)
    if chroma.shape != (12,):
        raise ValueError(f"chroma_mean must have 12 pitch classes, got shape {chroma.shape}")
    if not np.all(np.isfinite(chroma)):
        raise ValueError("chroma_mean contains NaN or infinite values")
    spread = chroma.std()
    if spread < 1e-12:
        return _KEY_NAMES[0], 0.0
    z = (chroma - chroma.mean()) / spread
    correlations = _KEY_TEMPLATES @ z / 12.0
    best = int(np.argmax(correlations))
    return _KEY_NAMES[best], float(correlations[best])


def _key_features(chroma_mean: np.ndarray) -> np.ndarray:
    """Key as a point on the circle of fifths, plus mode and how tonal the clip is.

    A minor key is placed at its relative major (A minor next to C major) because they share
    their notes, and neighbours on the circle of fifths share all but one: so distance in these
    features follows harmonic closeness, where a raw tonic index (0..11) would not. An undefined
    key (correlation <= 0) is all zeros, the centre of the circle.
    """
    name, strength = estimate_key(chroma_mean)
    if strength <= 0:
        return np.zeros(4, dtype=np.float32)
    tonic_name, mode = name.split()
    tonic = PITCH_CLASSES.index(tonic_name)
    major = mode == "major"
    relative_major = tonic if major else (tonic + 3) % 12
    angle = 2 * np.pi * ((relative_major * 7) % 12) / 12
    return np.array([np.sin(angle), np.cos(angle), float(major), strength], dtype=np.float32)


def _chroma(y: np.ndarray, sr: int) -> np.ndarray:
    """Constant-Q chroma rather than STFT chroma: a 2048-point STFT cannot separate semitones
    below about C4, so a plain C major triad smears into its neighbours and reads as E minor.

    tuning=0 (A440): estimating tuning needs a pitch track per clip and only helps recordings
    detuned by close to a quarter tone. librosa warns that the lowest, downsampled octaves of a
    clip shorter than about 1.5 s are shorter than one FFT frame; it zero-pads them, which is
    what this function would do anyway, so that one warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"n_fft=\d+ is too large for input signal", category=UserWarning)
        return librosa.feature.chroma_cqt(y=y, sr=sr, hop_length=HOP, tuning=0.0)


def audio_features(y: np.ndarray, sr: int) -> np.ndarray:
    """Timbre, harmony, dynamics and rhythm summary of a mono clip, ordered as AUDIO_FEATURE_NAMES.

    Silence and very short clips give well-defined finite values rather than NaN: statistics
    that do not exist for them (no beats -> no tempo, flat chroma -> no key, zero energy ->
    no spectral centroid) are reported as 0. They must be finite because one NaN would spread
    through standardisation and PCA into every coordinate of the track's embedding, and into
    the scaler and PCA of the whole catalogue at fit time. Clips shorter than one FFT frame are
    zero-padded to one frame: padding with silence does not change the spectral shape.
    """
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1:
        raise ValueError(f"audio must be mono (1-D), got shape {y.shape}")
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    if not np.all(np.isfinite(y)):
        raise ValueError("audio contains NaN or infinite samples (corrupt decode)")
    if len(y) < N_FFT:
        y = np.pad(y, (0, N_FFT - len(y)))

    # One STFT feeds every spectral feature; librosa would otherwise recompute it per call.
    S = np.abs(librosa.stft(y, n_fft=N_FFT, hop_length=HOP))
    power = S**2
    mel_db = librosa.power_to_db(librosa.feature.melspectrogram(S=power, sr=sr))
    mfcc = librosa.feature.mfcc(S=mel_db, n_mfcc=N_MFCC)
    chroma = _chroma(y, sr)
    centroid = librosa.feature.spectral_centroid(S=S, sr=sr)[0]
    bandwidth = librosa.feature.spectral_bandwidth(S=S, sr=sr)[0]
    rolloff = librosa.feature.spectral_rolloff(S=S, sr=sr)[0]
    contrast = librosa.feature.spectral_contrast(S=S, sr=sr, n_bands=N_CONTRAST_BANDS)
    zcr = librosa.feature.zero_crossing_rate(y, frame_length=N_FFT, hop_length=HOP)[0]
    rms = librosa.feature.rms(S=S, frame_length=N_FFT)[0]

    onset_env = librosa.onset.onset_strength(S=mel_db, sr=sr, hop_length=HOP)
    tempo, beats = librosa.beat.beat_track(onset_envelope=onset_env, sr=sr, hop_length=HOP)
    tempo = float(np.atleast_1d(tempo)[0])
    beats = beats[beats < len(onset_env)]
    beat_strength = float(onset_env[beats].mean()) if len(beats) else 0.0

    chroma_mean = chroma.mean(axis=1)
    features = np.concatenate(
        [
            mfcc.mean(axis=1),
            mfcc.std(axis=1),
            chroma_mean,
            [centroid.mean(), centroid.std(), bandwidth.mean(), bandwidth.std(), rolloff.mean(), rolloff.std()],
            contrast.mean(axis=1),
            [zcr.mean(), rms.mean(), rms.std(), tempo, beat_strength],
            _key_features(np.nan_to_num(chroma_mean)),
        ]
    ).astype(np.float32)
    bad = ~np.isfinite(features)
    if bad.any():
        names = [n for n, b in zip(AUDIO_FEATURE_NAMES, bad) if b]
        log.debug("audio features undefined for this clip, set to 0: %s", names)
        features[bad] = 0.0
    return features


def load_audio(path: str, sr: int, max_seconds: float) -> np.ndarray:
    """Decode at most `max_seconds` from the start, downmix to mono, resample to `sr`.

    Reads only the frames it needs, so analysing the first 30 s of a long track does not decode
    the whole file. Decoding errors raise ValueError naming the file, for the dead-letter queue.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    try:
        info = sf.info(str(path))
        frames = min(info.frames, int(np.ceil(max_seconds * info.samplerate))) if info.frames > 0 else -1
        data, native_sr = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise ValueError(f"cannot decode audio {path}: {exc}") from exc
    y = data.mean(axis=1)
    if native_sr != sr:
        y = librosa.resample(y, orig_sr=native_sr, target_sr=sr)
    return np.ascontiguousarray(y[: int(max_seconds * sr)], dtype=np.float32)


REFERENCE_YEAR = 2000
DEFAULT_DURATION_MS = 210_000.0
"""Stand-ins for missing values. Fixed constants, not batch medians, so that a track's features
do not depend on which other tracks share its batch: a cold-start row equals its catalogue row."""


def metadata_features(tracks: pd.DataFrame, genres: list[str]) -> tuple[np.ndarray, list[str]]:
    """Genre multi-hot (over the configured vocabulary), decade-scaled release year, log duration,
    explicit flag and artist popularity (0 when the column is absent).

    Genres outside `genres` are ignored with a warning: the vocabulary fixes the width of the
    embedding input, so it cannot grow with the data.
    """
    if len(set(genres)) != len(genres) or not genres:
        raise ValueError(f"genres must be a non-empty list of distinct names, got {genres}")
    missing = [c for c in ("genres", "release_year", "duration_ms", "explicit") if c not in tracks.columns]
    if missing:
        raise ValueError(f"tracks is missing columns {missing}")
    index = {g: i for i, g in enumerate(genres)}
    multi_hot = np.zeros((len(tracks), len(genres)), dtype=np.float32)
    unknown: set[str] = set()
    for row, value in enumerate(tracks["genres"].to_numpy()):
        if isinstance(value, str):
            value = [value]
        elif value is None or (np.ndim(value) == 0 and pd.isna(value)):
            value = []
        for genre in value:
            if genre in index:
                multi_hot[row, index[genre]] = 1.0
            else:
                unknown.add(str(genre))
    if unknown:
        log.warning("ignoring genres outside the configured vocabulary: %s", sorted(unknown))

    year = pd.to_numeric(tracks["release_year"], errors="coerce").fillna(REFERENCE_YEAR).to_numpy(np.float64)
    duration = pd.to_numeric(tracks["duration_ms"], errors="coerce").fillna(DEFAULT_DURATION_MS).to_numpy(np.float64)
    if (duration < 0).any():
        raise ValueError("duration_ms contains negative values")
    explicit = tracks["explicit"].fillna(False).astype(bool).to_numpy(np.float64)
    if "artist_popularity" in tracks.columns:
        popularity = pd.to_numeric(tracks["artist_popularity"], errors="coerce").fillna(0.0).to_numpy(np.float64)
    else:
        popularity = np.zeros(len(tracks))
    numeric = np.column_stack(
        [(year - REFERENCE_YEAR) / 10.0, np.log1p(duration / 1000.0), explicit, popularity]
    ).astype(np.float32)
    names = [f"genre_{g}" for g in genres] + ["release_decade", "log_duration_s", "explicit", "artist_popularity"]
    return np.hstack([multi_hot, numeric]), names


@dataclass
class ContentEmbedder:
    """Standardise -> PCA -> L2-normalise, held as plain arrays.

    Plain arrays instead of fitted scikit-learn objects so the artifact is an npz any process
    (or language) can read without unpickling, and a one-row transform at request time costs a
    subtraction and one small matrix product.
    """

    mean_: np.ndarray
    scale_: np.ndarray
    components_: np.ndarray  # (dim, n_features)
    pca_mean_: np.ndarray  # (n_features,), in standardised space
    explained_variance_ratio_: np.ndarray = field(default_factory=lambda: np.zeros(0))
    feature_names: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return int(self.components_.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.components_.shape[1])

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        dim: int,
        seed: int,
        sample_size: int | None = None,
        feature_names: list[str] | None = None,
    ) -> "ContentEmbedder":
        """Fit on the catalogue's feature matrix; `sample_size` caps the rows used (random,
        seeded) because scaler and PCA statistics settle long before a large catalogue ends."""
        X = _check_matrix(features, None)
        n_rows, n_features = X.shape
        if feature_names is not None and len(feature_names) != n_features:
            raise ValueError(f"{len(feature_names)} feature names for {n_features} features")
        if sample_size is not None:
            if sample_size < 1:
                raise ValueError(f"sample_size must be >= 1, got {sample_size}")
            if sample_size < n_rows:
                rows = np.random.default_rng(seed).choice(n_rows, size=sample_size, replace=False)
                X = X[np.sort(rows)]
        if not 1 <= dim <= min(X.shape):
            raise ValueError(
                f"dim must be in [1, {min(X.shape)}] for {X.shape[0]} rows x {n_features} features, got {dim}"
            )
        X = X.astype(np.float64)
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        # Constant features carry no information; scale 1 keeps them at 0 instead of dividing by 0.
        scale[scale < 1e-12] = 1.0
        pca = PCA(n_components=dim, random_state=seed).fit((X - mean) / scale)
        log.debug("content PCA keeps %.1f%% of variance in %d dims", 100 * pca.explained_variance_ratio_.sum(), dim)
        return cls(
            mean_=mean.astype(np.float32),
            scale_=scale.astype(np.float32),
            components_=pca.components_.astype(np.float32),
            pca_mean_=pca.mean_.astype(np.float32),
            explained_variance_ratio_=pca.explained_variance_ratio_.astype(np.float32),
            feature_names=list(feature_names or []),
        )

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Unit-norm float32 embeddings; a 1-D row gives a 1-D vector (cold start).

        A row that lands exactly on the PCA mean has no direction and stays all-zero.
        """
        single = np.ndim(features) == 1
        X = _check_matrix(np.atleast_2d(features), self.n_features, allow_empty=True).astype(np.float32)
        projected = ((X - self.mean_) / self.scale_ - self.pca_mean_) @ self.components_.T
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        out = np.divide(projected, norms, out=np.zeros_like(projected), where=norms > 0).astype(np.float32)
        return out[0] if single else out

    def save(self, path: str | Path) -> None:
        """npz of plain arrays (no pickle); written to exactly `path`."""
        with open(path, "wb") as fh:
            np.savez(
                fh,
                mean_=self.mean_,
                scale_=self.scale_,
                components_=self.components_,
                pca_mean_=self.pca_mean_,
                explained_variance_ratio_=self.explained_variance_ratio_,
                feature_names=np.array(json.dumps(self.feature_names)),
            )

    @classmethod
    def load(cls, path: str | Path) -> "ContentEmbedder":
        with np.load(path, allow_pickle=False) as data:
            missing = {"mean_", "scale_", "components_", "pca_mean_"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a ContentEmbedder artifact: missing {sorted(missing)}")
            return cls(
                mean_=data["mean_"],
                scale_=data["scale_"],
                components_=data["components_"],
                pca_mean_=data["pca_mean_"],
                explained_variance_ratio_=data.get("explained_variance_ratio_", np.zeros(0)),
                feature_names=json.loads(str(data["feature_names"])) if "feature_names" in data.files else [],
            )


def _check_matrix(features: np.ndarray, n_features: int | None, allow_empty: bool = False) -> np.ndarray:
    X = np.asarray(features)
    if X.ndim != 2:
        raise ValueError(f"features must be 2-D (rows x features), got shape {X.shape}")
    if X.shape[0] == 0 and not allow_empty:
        raise ValueError("features has no rows")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"features has {X.shape[1]} columns, the embedder was fitted on {n_features}")
    if not np.all(np.isfinite(X)):
        raise ValueError("features contains NaN or infinite values")
    return X
