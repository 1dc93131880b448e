"""Content embeddings from audio and metadata: what lets a track nobody has played yet get
recommended (cold start) and what "more like this" means when listening data is thin.

Pure functions plus one small fitted transform, so that a Ray Data stage can wrap them and
cold start (training/cold_start.py) can call exactly the same code for one new track:

    analysis = analyse_tracks(tracks, sr=settings.sample_rate, max_seconds=settings.analysis_seconds)
    #   decode_audio -> audio_features per row; a bad file is a row with error_reason, not an exception
    features, names, audio_ok = content_features(tracks, analysis, genres, artist_popularity)
    embedder = ContentEmbedder.fit(features[audio_ok], dim=settings.embedding_dim, seed=0, sample_size=n)
    vectors = embedder.transform(fill_missing_audio(features, audio_ok, embedder))   # unit-norm float32

The first librosa call in a fresh environment compiles with numba (about 20 s).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import av
import librosa
import numpy as np
import pandas as pd
import scipy.fft
import scipy.signal
import scipy.sparse
import soxr
from sklearn.decomposition import PCA

log = logging.getLogger(__name__)

N_FFT = 2048
HOP = 512
N_MFCC = 20
N_CONTRAST_BANDS = 6  # librosa returns n_bands + 1 rows
CHROMA_FMIN = 32.703  # C1, librosa's default
CHROMA_OCTAVES = 6  # C1..B6: the partials that decide a key; librosa's default 7 adds C7..B7
CHROMA_BINS_PER_OCTAVE = 36  # chroma_cqt's default: narrow filters keep neighbouring semitones apart
CHROMA_MIN_RATE = 5000.0
"""Chroma is computed on the clip decimated by an integer factor to at least this rate (22.05 kHz
-> 5.5 kHz): the top bin (2.08 kHz) and its filter's bandwidth stay well below Nyquist. (4.41 kHz
gives the same keys on the labelled clips but moves one clip's mood neighbour.)"""
CHROMA_HOP = 1024  # samples at the decimated rate (0.19 s at 5.5 kHz): chroma is averaged over the clip
ROLL_PERCENT = 0.85
SILENCE_PEAK = 1e-4
"""Peak amplitude (-80 dBFS) below which a decoded clip is treated as silent: its features would
be all stand-ins, so it is reported as failed rather than embedded as if it were music."""

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

AUDIO_FEATURE_VERSION = 4
"""Bumped whenever a feature's definition changes (2: chroma from a cached 6-octave constant-Q
kernel instead of librosa's 7-octave chroma_cqt; 3: decoded, downmixed and resampled by
FFmpeg instead of libsndfile + soxr, which moves every feature slightly; 4: the clip decimated
for chroma by soxr instead of scipy's polyphase filter, and the roll-off found in blocks, whose
summation order moves a frame's roll-off by one bin now and then). The content
manifest records it, and cold start refuses an artifact of another version: its scaler and
PCA were fitted on features defined differently, so a new track would not get the vector the
batch job would give it."""
AUDIO_FEATURE_DEFINITION = {
    "stft": {"n_fft": N_FFT, "hop_length": HOP, "window": "hann"},
    "mfcc": {"n_mfcc": N_MFCC, "n_mels": 128},
    "chroma": {
        "transform": "constant-Q (librosa.filters.wavelet kernel, Hann, 1% sparsity), magnitude, tuning A440",
        "fmin_hz": CHROMA_FMIN, "octaves": CHROMA_OCTAVES, "bins_per_octave": CHROMA_BINS_PER_OCTAVE,
        "min_rate_hz": CHROMA_MIN_RATE, "hop_at_decimated_rate": CHROMA_HOP, "decimation": "soxr HQ",
    },
    "spectral_rolloff_percent": ROLL_PERCENT,
    "spectral_contrast_bands": N_CONTRAST_BANDS,
    "tempo": "librosa.beat.beat_track on onset_strength of the log-mel spectrogram",
    "key": "Krumhansl-Schmuckler on the clip's mean chroma",
}
"""How the audio features are computed, for the artifact manifest beside the feature names."""


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


@lru_cache(maxsize=4)
def _spectral_bases(sr: int) -> tuple[np.ndarray, np.ndarray, scipy.sparse.csr_matrix]:
    """(bin frequencies, their squares, mel filters) of the N_FFT spectrogram at one rate.

    librosa rebuilds its filter banks on every call; built once per rate, a clip pays only the
    matrix products. The mel filters are held sparse: each of the 128 triangles spans a few
    bins of 1025, so the product costs 2% of the dense one librosa computes.
    """
    freqs = librosa.fft_frequencies(sr=sr, n_fft=N_FFT).astype(np.float32)
    freqs.setflags(write=False)
    mel = scipy.sparse.csr_matrix(librosa.filters.mel(sr=sr, n_fft=N_FFT, dtype=np.float32))
    return freqs, freqs**2, mel


@lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    """librosa.stft's default window: periodic Hann."""
    window = scipy.signal.get_window("hann", n, fftbins=True).astype(np.float32)
    window.setflags(write=False)
    return window


def _stft(y: np.ndarray, n_fft: int, hop: int, window: np.ndarray | None = None) -> np.ndarray:
    """Centred, zero-padded STFT as librosa.stft(center=True, pad_mode="constant") computes
    it, (bins, frames) complex64; `window` None is rectangular.

    The frames are windowed and transformed a block at a time, so each block's copy stays in
    cache while its FFTs run: about 4 ms for a 30 s clip at N_FFT, against 10 for librosa's,
    which copies through a larger buffer first (same values to float32 rounding).
    """
    padded = np.pad(y, n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    out = np.empty((len(frames), n_fft // 2 + 1), dtype=np.complex64)
    block = max(1, (1 << 19) // n_fft)  # 2 MB of float32 frames
    for start in range(0, len(frames), block):
        chunk = frames[start : start + block]
        out[start : start + block] = scipy.fft.rfft(chunk if window is None else chunk * window, axis=1)
    return out.T


@dataclass(frozen=True)
class _ConstantQChroma:
    """A constant-Q transform's kernel in the frequency domain (Brown & Puckette), built once."""

    decimate: int
    n_fft: int
    kernel: scipy.sparse.csr_matrix  # (bins, spectrum bins up to the last one it reads) complex64
    inverse_sqrt_lengths: np.ndarray  # (bins, 1): librosa's `scale=True` normalisation
    to_chroma: np.ndarray  # (12, bins)


@lru_cache(maxsize=4)
def _constant_q_chroma(sr: int) -> _ConstantQChroma:
    """The kernel librosa.cqt would build for chroma_cqt's defaults (C1 up, 36 bins per octave,
    Hann wavelets, 1% sparsity), for CHROMA_OCTAVES octaves at sr / decimate.

    Chroma needs no more than a few kHz, so the clip is decimated to about CHROMA_MIN_RATE and
    one long-window FFT (at least the longest wavelet, about 1.6 s for C1) per frame covers
    every bin: what librosa does per octave with resampling, in a single pass.
    """
    decimate = max(1, int(sr // CHROMA_MIN_RATE))
    rate = sr / decimate
    freqs = CHROMA_FMIN * 2.0 ** (np.arange(CHROMA_OCTAVES * CHROMA_BINS_PER_OCTAVE) / CHROMA_BINS_PER_OCTAVE)
    filters, lengths = librosa.filters.wavelet(freqs=freqs, sr=rate, window="hann", filter_scale=1, pad_fft=True, norm=1)
    n_fft = filters.shape[1]
    basis = np.fft.fft(filters * (lengths[:, np.newaxis] / n_fft), n=n_fft, axis=1)[:, : n_fft // 2 + 1]
    kernel = librosa.util.sparsify_rows(basis, quantile=0.01, dtype=np.complex64)
    kernel = kernel[:, : kernel.indices.max() + 1].tocsr()  # the spectrum above B6's band is never read
    to_chroma = librosa.filters.cq_to_chroma(
        len(freqs), bins_per_octave=CHROMA_BINS_PER_OCTAVE, n_chroma=12, fmin=CHROMA_FMIN
    ).astype(np.float32)
    return _ConstantQChroma(decimate, n_fft, kernel, (1.0 / np.sqrt(lengths)).astype(np.float32)[:, np.newaxis], to_chroma)


def _chroma(y: np.ndarray, sr: int) -> np.ndarray:
    """Constant-Q chroma (12 x frames), as librosa.feature.chroma_cqt(tuning=0) computes it.

    Constant-Q rather than STFT chroma: a 2048-point STFT cannot separate semitones below about
    C4, so a plain C major triad smears into its neighbours and reads as E minor; on the
    labelled real clips STFT chroma (even with an 8192-point window) gets 1-4 more keys wrong.
    librosa's chroma_cqt rebuilds its wavelet kernels on every call and resamples per octave
    (about 70 ms of a 30 s clip); with the kernel cached and the clip decimated once (by soxr:
    1.7 ms of a 30 s clip against 7 for scipy's polyphase filter) it costs about 8 ms, and the
    key estimates of the labelled clips are the same (correlations move in the third decimal). tuning=0 (A440): estimating tuning needs a pitch track per clip and only
    helps recordings detuned by close to a quarter tone. The hop is coarse because chroma is
    only averaged over the clip.
    """
    cq = _constant_q_chroma(sr)
    if cq.decimate > 1:
        y = soxr.resample(y, sr, sr / cq.decimate, quality="HQ")
    if len(y) < cq.n_fft:  # a clip shorter than C1's wavelet: pad with silence, as librosa would
        y = np.pad(y, (0, cq.n_fft - len(y)))
    # Only the bins the kernel reads, laid out bin-major: the sparse product runs over
    # contiguous rows (2.8 ms instead of 4.8 on the frame-major transform).
    spectrum = np.ascontiguousarray(_stft(y, cq.n_fft, CHROMA_HOP)[: cq.kernel.shape[1]])
    magnitude = np.abs(cq.kernel @ spectrum) * cq.inverse_sqrt_lengths
    return librosa.util.normalize(cq.to_chroma @ magnitude, norm=np.inf, axis=0)


def _spectral_shape(S: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame spectral centroid, bandwidth (p=2) and 85% roll-off of a magnitude spectrogram,
    as librosa.feature.spectral_centroid / spectral_bandwidth / spectral_rolloff define them.

    librosa builds several spectrogram-sized float64 temporaries for these (about 65 ms of a
    30 s clip); as two matrix products and a two-level search they cost a few ms. Bandwidth uses
    sum(p * (f - c)^2) = E[f^2] - c^2 over the normalised column p; silent frames are 0 in all
    three, as in librosa.
    """
    freqs, freqs_sq, _ = _spectral_bases(sr)
    total = S.sum(axis=0)
    safe = np.where(total > np.finfo(np.float32).tiny, total, 1.0).astype(np.float32)
    centroid = (freqs @ S) / safe
    bandwidth = np.sqrt(np.maximum((freqs_sq @ S) / safe - centroid**2, 0.0))
    return centroid, bandwidth, freqs[_rolloff_bins(S, ROLL_PERCENT * total)]


def _rolloff_bins(S: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """Per frame, the first bin whose cumulative magnitude reaches `threshold` (librosa's
    roll-off; 0 for a silent frame).

    A cumulative sum over the whole spectrogram is a sequential pass of about 4 ms for a 30 s
    clip; summing blocks of bins, finding the block where the threshold falls, and summing
    within that block alone reads the spectrogram once, vectorised.
    """
    bins, frames = S.shape
    width = next(w for w in range(32, 0, -1) if bins % w == 0)  # 1025 bins: 41 blocks of 25
    blocks = S.T.reshape(frames, bins // width, width)  # a view when S is frame-major (our STFT)
    before = np.cumsum(blocks.sum(axis=2), axis=1)
    block = (before < threshold[:, np.newaxis]).sum(axis=1)
    block = np.minimum(block, bins // width - 1)
    rows = np.arange(frames)
    reached = np.where(block > 0, before[rows, np.maximum(block - 1, 0)], 0.0)
    within = np.cumsum(blocks[rows, block], axis=1) + reached[:, np.newaxis]
    offset = (within < threshold[:, np.newaxis]).sum(axis=1)
    return np.minimum(block * width + offset, bins - 1)


@lru_cache(maxsize=4)
def _contrast_bands(sr: int) -> tuple[tuple[slice, int], ...]:
    """(bins, how many at each end) of librosa.feature.spectral_contrast's octave bands at its
    defaults (fmin 200 Hz, quantile 0.02) for the N_FFT spectrogram: contiguous ranges."""
    freqs = librosa.fft_frequencies(sr=sr, n_fft=N_FFT)
    edges = np.zeros(N_CONTRAST_BANDS + 2)
    edges[1:] = 200.0 * 2.0 ** np.arange(N_CONTRAST_BANDS + 1)
    bands = []
    for k, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        idx = np.flatnonzero((freqs >= low) & (freqs <= high))
        start = idx[0] - 1 if k > 0 else idx[0]
        stop = len(freqs) if k == N_CONTRAST_BANDS else idx[-1] + 1
        n_band = stop - start
        if k < N_CONTRAST_BANDS:
            stop -= 1  # librosa drops the band's top bin but counts it for the quantile
        bands.append((slice(int(start), int(stop)), max(int(np.rint(0.02 * n_band)), 1)))
    return tuple(bands)


def _spectral_contrast(S: np.ndarray, sr: int) -> np.ndarray:
    """librosa.feature.spectral_contrast(S=S, sr=sr, n_bands=N_CONTRAST_BANDS): per band and
    frame, the dB difference between the mean of its loudest and of its quietest 2% of bins.

    Each band is sorted along a frame's own bins, contiguous in our frame-major spectrogram
    (S.T): about 2 ms of a 30 s clip, where librosa sorts across frames and takes 33 ms on the
    same array (np.partition along the same axis is slower than the sort, 13 ms).
    """
    frames = S.T
    peak = np.empty((N_CONTRAST_BANDS + 1, frames.shape[0]), dtype=np.float64)
    valley = np.empty_like(peak)
    for k, (bins, n) in enumerate(_contrast_bands(sr)):
        ordered = np.sort(frames[:, bins], axis=1)
        valley[k] = ordered[:, :n].mean(axis=1)
        peak[k] = ordered[:, -n:].mean(axis=1)
    return librosa.power_to_db(peak) - librosa.power_to_db(valley)


def _zero_crossing_rate(y: np.ndarray) -> np.ndarray:
    """Per-frame zero-crossing rate exactly as librosa.feature.zero_crossing_rate (frames of
    N_FFT every HOP, centred with edge padding, |x| <= 1e-10 counted as 0 and 0 as positive),
    from one pass of sign changes and a cumulative sum instead of a framed copy of the clip."""
    padded = np.pad(y, N_FFT // 2, mode="edge")
    negative = np.signbit(padded) & (np.abs(padded) > 1e-10)
    changes = np.concatenate([[0], np.cumsum(negative[1:] != negative[:-1], dtype=np.int64)])
    starts = np.arange(1 + (len(padded) - N_FFT) // HOP) * HOP
    # Frame t holds samples starts[t] .. starts[t] + N_FFT - 1: N_FFT - 1 neighbouring pairs.
    return (changes[starts + N_FFT - 1] - changes[starts]) / N_FFT


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

    # One STFT feeds every spectral feature, the onsets and the tempo.
    S = np.abs(_stft(y, N_FFT, HOP, _hann(N_FFT)))
    power = S**2
    mel_db = librosa.power_to_db(_spectral_bases(sr)[2] @ power)  # = melspectrogram(S=power)
    mfcc = librosa.feature.mfcc(S=mel_db, n_mfcc=N_MFCC)
    chroma = _chroma(y, sr)
    centroid, bandwidth, rolloff = _spectral_shape(S, sr)
    contrast = _spectral_contrast(S, sr)
    zcr = _zero_crossing_rate(y)
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


def compile_audio_kernels(sr: int, lock_path: Path) -> None:
    """Compile (or load from numba's cache) the librosa kernels `audio_features` runs, one
    process of the machine at a time, holding an exclusive lock on `lock_path`.

    Why: numba caches a `guvectorize` kernel (librosa's beat tracker and local maxima) as two
    files written one after the other (numba/numba#10128). Two processes compiling it at once,
    as the actors of a fresh pool do, can leave one process's kernel beside the other's wrapper,
    and from then on every process that loads the pair segfaults (librosa/librosa#1998), a
    crash Ray retries for ever. Here two fresh pools out of three left such a pair. Under the
    lock the first process compiles and writes both files, and the others load them whole.
    """
    import fcntl

    # Three seconds of clicks in noise: enough frames for onsets, beats and every kernel's path.
    y = (0.1 * np.random.default_rng(0).standard_normal(3 * sr)).astype(np.float32)
    y[:: sr // 2] += 0.9
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on an exception
        audio_features(y, sr)


class TrackAudioError(ValueError):
    """Why one track's audio could not be analysed; `reason` is a short code the job counts
    (missing_file, empty_audio, undecodable, silent, no_audio_path, bad_audio)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # mono float32 at the requested rate, at most max_seconds long
    total_seconds: float  # length of the whole file, which may be longer than what was decoded
    truncated: bool


def _open_source(uri: str):
    """A local path as is; `file://` stripped; any other URI (s3://, gs://, hdfs://) read
    through pyarrow's filesystems into memory, so the catalogue may point at object storage."""
    if "://" not in uri:
        return uri
    if uri.startswith("file://"):
        return uri[len("file://") :]
    import io

    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        with filesystem.open_input_file(path) as fh:
            return io.BytesIO(fh.read())
    except (OSError, ValueError) as exc:  # pyarrow raises these for unknown schemes and missing objects
        raise TrackAudioError("missing_file", f"cannot open audio {uri}: {exc}") from exc


RESAMPLED_FRAME = 1 << 14
"""Samples per frame out of FFmpeg's resampler: 40 arrays of a 30 s clip instead of one per
20 ms packet (1,500), the same samples for 6-10 ms less CPU."""


def decode_audio(uri: str, sr: int, max_seconds: float) -> DecodedAudio:
    """Decode at most `max_seconds` from the start, downmix any channel count to mono, resample
    any rate to `sr`.

    FFmpeg (through PyAV) decodes, downmixes and resamples in one pass: 62-67 ms of CPU per 30 s
    Opus clip against 249 ms for libsndfile + soxr (benchmarks/audio.py; decoding had been the
    larger part of the per-clip cost), and it reads AAC/M4A, which libsndfile cannot. Its downmix follows the
    -3 dB pan law (each of two channels at 1/sqrt(2)), so power, not amplitude, is kept: the
    level features are consistent across the catalogue either way. Decoding stops once the
    window is full, so a two-hour track costs what its first window costs. Every failure is a
    TrackAudioError whose reason the job counts and dead-letters.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if not isinstance(uri, str) or not uri.strip():
        raise TrackAudioError("no_audio_path", "track has no audio path")
    source = _open_source(uri)
    if isinstance(source, str):
        local = Path(source)
        if not local.is_file():
            raise TrackAudioError("missing_file", f"cannot decode audio {uri}: file not found")
        if local.stat().st_size == 0:
            raise TrackAudioError("empty_audio", f"cannot decode audio {uri}: file is empty (0 bytes)")
    wanted = int(max_seconds * sr)
    try:
        with av.open(source, metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise TrackAudioError("undecodable", f"cannot decode audio {uri}: no audio stream")
            stream = container.streams.audio[0]
            total_seconds = _duration_s(container, stream)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sr, frame_size=RESAMPLED_FRAME)
            chunks, have = [], 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray()[0])
                    have += out.samples
                if have >= wanted:
                    break
            else:
                chunks += [out.to_ndarray()[0] for out in resampler.resample(None)]
    except TrackAudioError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as exc:
        raise TrackAudioError("undecodable", f"cannot decode audio {uri}: {exc}") from exc
    y = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if y.size == 0:
        raise TrackAudioError("empty_audio", f"cannot decode audio {uri}: no samples")
    y = np.ascontiguousarray(y[:wanted], dtype=np.float32)
    total_seconds = max(total_seconds or 0.0, y.size / sr)
    return DecodedAudio(samples=y, total_seconds=float(total_seconds), truncated=total_seconds > max_seconds)


def _duration_s(container, stream) -> float | None:
    """The whole file's length from the stream's or the container's header, None if neither
    says (some raw streams): the caller then counts what it decoded."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def load_audio(path: str, sr: int, max_seconds: float) -> np.ndarray:
    """Mono float32 samples of the first `max_seconds` (see `decode_audio`)."""
    return decode_audio(path, sr, max_seconds).samples


ANALYSIS_COLUMNS = [
    "track_id", "audio", "key", "key_strength", "tempo_bpm",
    "seconds_total", "seconds_analysed", "truncated", "error_reason", "error",
]
"""One row per track out of `analyse_tracks`: what the Ray Data stage emits and cold start reuses."""


def unanalysed(track_id: str) -> dict:
    """A track's ANALYSIS_COLUMNS row before (or without) its analysis: no key, zero measures."""
    return dict(zip(ANALYSIS_COLUMNS, [track_id, None, None, 0.0, 0.0, 0.0, 0.0, False, None, None]))


def analyse_tracks(tracks: pd.DataFrame, sr: int, max_seconds: float) -> pd.DataFrame:
    """Decode and analyse each (`track_id`, `audio_path`) row; never raises for one bad track.

    A failed track keeps its row with `error_reason`/`error` set and zero features, so the
    caller can dead-letter it and still give it a metadata-only embedding.
    """
    rows = []
    for track_id, uri in zip(tracks["track_id"].to_numpy(), tracks["audio_path"].to_numpy()):
        row = unanalysed(track_id)
        try:
            decoded = decode_audio(uri, sr, max_seconds)
            row.update(seconds_total=decoded.total_seconds, truncated=decoded.truncated)
            row["seconds_analysed"] = len(decoded.samples) / sr
            if len(decoded.samples) == 0 or float(np.abs(decoded.samples).max()) < SILENCE_PEAK:
                raise TrackAudioError("silent", f"audio {uri} is silent (peak below {SILENCE_PEAK:g})")
            features = audio_features(decoded.samples, sr)
        except TrackAudioError as exc:
            row.update(error_reason=exc.reason, error=str(exc))
            features = np.zeros(len(AUDIO_FEATURE_NAMES), dtype=np.float32)
        except ValueError as exc:  # NaN samples from a damaged stream, and the like
            row.update(error_reason="bad_audio", error=f"audio {uri}: {exc}")
            features = np.zeros(len(AUDIO_FEATURE_NAMES), dtype=np.float32)
        else:
            row["key"], row["key_strength"] = estimate_key(features[_CHROMA])
            row["tempo_bpm"] = float(features[_TEMPO])
        row["audio"] = features
        rows.append(row)
    return pd.DataFrame(rows, columns=ANALYSIS_COLUMNS)


_CHROMA = slice(AUDIO_FEATURE_NAMES.index("chroma_C_mean"), AUDIO_FEATURE_NAMES.index("chroma_C_mean") + 12)
_TEMPO = AUDIO_FEATURE_NAMES.index("tempo_bpm")


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


def genre_vocabulary(genres: pd.Series) -> list[str]:
    """Sorted distinct genres of a catalogue: fixes the multi-hot width the embedder is fitted on."""
    found: set[str] = set()
    for value in genres.to_numpy():
        if isinstance(value, str):
            found.add(value)
        elif value is not None and np.ndim(value) > 0:
            found.update(str(g) for g in value)
    if not found:
        found = {"unknown"}
    return sorted(found)


def content_features(
    tracks: pd.DataFrame, analysis: pd.DataFrame, genres: list[str], artist_popularity: dict[str, float]
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(features, names, audio_ok) for catalogue rows and their `analyse_tracks` rows.

    The one place audio and metadata meet, used by the batch job and by cold start alike, so a
    new track's features are computed exactly as its catalogue row's would be. A duration the
    catalogue lacks is taken from the decoded file; an artist without plays has popularity 0.
    """
    merged = tracks.merge(analysis, on="track_id", how="left", validate="one_to_one")
    decoded_ms = pd.to_numeric(merged["seconds_total"], errors="coerce") * 1000.0
    merged["duration_ms"] = pd.to_numeric(merged["duration_ms"], errors="coerce").fillna(decoded_ms.where(decoded_ms > 0))
    merged["artist_popularity"] = merged["artist_id"].map(artist_popularity).fillna(0.0).astype(float)
    meta, meta_names = metadata_features(merged, genres)
    n_audio = len(AUDIO_FEATURE_NAMES)
    audio_ok = merged["error_reason"].isna().to_numpy() & merged["audio"].notna().to_numpy()
    audio = np.zeros((len(merged), n_audio), dtype=np.float32)
    if audio_ok.any():
        audio[audio_ok] = np.stack(merged.loc[audio_ok, "audio"].to_numpy())
    return np.hstack([audio, meta]).astype(np.float32), list(AUDIO_FEATURE_NAMES) + meta_names, audio_ok


def fill_missing_audio(features: np.ndarray, audio_ok: np.ndarray, embedder: "ContentEmbedder") -> np.ndarray:
    """Audio columns of failed tracks set to the fitted mean: after standardisation they are 0,
    so the track is placed by its metadata alone instead of as if it were silent music."""
    out = np.array(features, dtype=np.float32, copy=True)
    n_audio = len(AUDIO_FEATURE_NAMES)
    out[~np.asarray(audio_ok, dtype=bool), :n_audio] = embedder.mean_[:n_audio]
    return out


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

    def params(self) -> dict:
        """Scaler and PCA as JSON-ready lists, for the artifact manifest (readable without numpy)."""
        return {
            "scaler": {"mean": self.mean_.tolist(), "scale": self.scale_.tolist()},
            "pca": {
                "n_components": self.dim,
                "mean": self.pca_mean_.tolist(),
                "components": self.components_.tolist(),
                "explained_variance_ratio": self.explained_variance_ratio_.tolist(),
            },
        }

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
