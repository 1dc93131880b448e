"""Audio feature extraction: throughput on real clips, Ray Data scaling, and accuracy against
ground truth.

    .venv/bin/python -m benchmarks.audio                      # here: concurrency 1 and 2
    bash benchmarks/audio_16core.sh                           # a 16-core machine: 1..16

Data, fetched at run time into --cache-dir (never committed): the 28 labelled clips of about
33 s from the `immich-memories-music` wheel (tempo, key and mood from its LICENSE-MUSIC) and,
with --debian, the human-made Warzone 2100 soundtrack from Debian, run through the real
content job.

Figures:
- warm-up: the first analysis in a fresh process (numba compiles librosa's kernels, or loads
  them from its cache), reported apart from steady state;
- plain loop: one process analysing the clips one after another (the peer);
- Ray Data at each concurrency (one actor per CPU): steady-state clips/s, timed from the batch
  on which the last actor finished warming up to the last batch, in wall time and per CPU-second
  each actor spent; `clips_per_s_per_core` is concurrency 1's clips per CPU-second (on a shared
  machine wall time also counts the neighbours' work; the wall figure is reported beside it),
  `scaling_2_over_1` is concurrency 2 over 1 in wall time;
- decode vs feature time per clip, so a target miss can be attributed: wall, and CPU split into
  decode+downmix+resample (FFmpeg, against libsndfile + soxr as the project did before), and
  features;
- tempo accuracy (within 4% of the label: exact, and allowing half/double tempo), key
  accuracy, and mood neighbourhoods: leave-one-out 1-NN mood agreement and silhouette of the
  audio-only embedding (metadata excluded: it would not know the mood).

The last stdout line is one JSON object with `clips_per_s_per_core`, `tempo_acc`,
`scaling_2_over_1`, `failed` and the rest of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from app.data.audio_catalog import immich_music_catalog
from training.content import AUDIO_FEATURE_NAMES, ContentEmbedder, analyse_tracks, audio_features, decode_audio

SR = 22050


def tempo_accuracy(estimate: np.ndarray, truth: np.ndarray, tolerance: float = 0.04) -> tuple[float, float]:
    """(exact, within octave): share within `tolerance` of the label, and of label x {1/2, 1, 2}."""
    ratio = np.asarray(estimate, dtype=float) / np.asarray(truth, dtype=float)
    exact = np.abs(ratio - 1) <= tolerance
    octave = np.min([np.abs(ratio / f - 1) for f in (0.5, 1.0, 2.0)], axis=0) <= tolerance
    return float(exact.mean()), float(octave.mean())


def key_score(estimate: str | None, truth: str) -> float:
    """MIREX key score: 1 same key, 0.5 a fifth apart (same mode), 0.3 relative, 0.2 parallel."""
    from training.content import PITCH_CLASSES

    if not estimate:
        return 0.0
    (et, em), (tt, tm) = estimate.split(), truth.split()
    e, t = PITCH_CLASSES.index(et), PITCH_CLASSES.index(tt)
    if (e, em) == (t, tm):
        return 1.0
    if em == tm and (e - t) % 12 in (5, 7):
        return 0.5
    if em != tm and (e - t) % 12 == (9 if em == "minor" else 3):
        return 0.3
    if em != tm and e == t:
        return 0.2
    return 0.0


def mood_structure(features: np.ndarray, moods: np.ndarray, dim: int = 8) -> dict:
    """How well an audio-only embedding groups clips by mood, against chance."""
    from sklearn.metrics import silhouette_score

    n_audio = len(AUDIO_FEATURE_NAMES)
    vectors = ContentEmbedder.fit(features[:, :n_audio], dim=dim, seed=0).transform(features[:, :n_audio])
    sim = vectors @ vectors.T
    np.fill_diagonal(sim, -np.inf)
    nn_agree = float((moods[np.argmax(sim, axis=1)] == moods).mean())
    _, counts = np.unique(moods, return_counts=True)
    chance = float(((counts * (counts - 1)).sum()) / (len(moods) * (len(moods) - 1)))
    return {
        "mood_nn_agreement": round(nn_agree, 3),
        "mood_nn_chance": round(chance, 3),
        "mood_silhouette_cosine": round(float(silhouette_score(vectors, moods, metric="cosine")), 3),
    }


def plain_loop(clips: pd.DataFrame, seconds: float) -> dict:
    """The peer: one process, clip after clip, decode and features timed apart (wall and CPU)."""
    import librosa
    import soundfile as sf

    wall = {"decode": 0.0, "features": 0.0}
    cpu = {"decode": 0.0, "features": 0.0, "read": 0.0}
    for uri in clips["audio_path"]:
        # The decoder the project used before FFmpeg: libsndfile, then a mean downmix and soxr,
        # timed beside it so the decode figure has a peer.
        c = time.process_time()
        with sf.SoundFile(uri) as fh:
            data = fh.read(frames=min(fh.frames, int(seconds * fh.samplerate)), dtype="float32", always_2d=True)
            librosa.resample(data.mean(axis=1), orig_sr=fh.samplerate, target_sr=SR)
        cpu["read"] += time.process_time() - c
        w0, c0 = time.perf_counter(), time.process_time()
        y = decode_audio(uri, SR, seconds).samples
        w1, c1 = time.perf_counter(), time.process_time()
        audio_features(y, SR)
        w2, c2 = time.perf_counter(), time.process_time()
        wall["decode"] += w1 - w0
        wall["features"] += w2 - w1
        cpu["decode"] += c1 - c0
        cpu["features"] += c2 - c1
    n = len(clips)
    return {
        "clips_per_s": n / (wall["decode"] + wall["features"]),
        "clips_per_cpu_s": n / (cpu["decode"] + cpu["features"]),
        "decode_ms": 1000 * wall["decode"] / n,
        "features_ms": 1000 * wall["features"] / n,
        "cpu_ms": 1000 * (cpu["decode"] + cpu["features"]) / n,
        "libsndfile_soxr_decode_cpu_ms": 1000 * cpu["read"] / n,
        "decode_cpu_ms": 1000 * cpu["decode"] / n,
        "features_cpu_ms": 1000 * cpu["features"] / n,
    }


class TimedExtractor:
    """The job's extractor plus the CPU seconds each batch cost in its actor: on a shared machine
    wall time measures the neighbours as much as the code, CPU time measures the code."""

    def __init__(self, sample_rate: int, max_seconds: float):
        from jobs.embed_content import AudioFeatureExtractor

        self.extract = AudioFeatureExtractor(sample_rate, max_seconds)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        start = time.process_time()
        out = self.extract(batch)
        return out.assign(cpu_s=(time.process_time() - start) / max(len(out), 1))


def ray_data_run(clips: pd.DataFrame, seconds: float, concurrency: int, batch_size: int) -> dict:
    """Steady-state throughput of the job's own extractor stage at a fixed actor pool size."""
    import ray

    from jobs.embed_content import track_blocks

    pipeline = track_blocks(clips, batch_size).map_batches(
        TimedExtractor,
        fn_constructor_kwargs={"sample_rate": SR, "max_seconds": seconds},
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="pandas",
        num_cpus=1,
    )
    start = time.perf_counter()
    arrivals, rows, cpu, failed = [], [], [], 0
    for batch in pipeline.iter_batches(batch_size=None, batch_format="pandas"):
        arrivals.append(time.perf_counter())
        rows.append(len(batch))
        cpu.append(float(batch["cpu_s"].sum()))
        failed += int(batch["error_reason"].notna().sum())
    total = arrivals[-1] - start
    # Steady state starts once every actor has delivered a batch (its warm-up is behind it).
    first = min(concurrency, len(arrivals) - 1)
    steady_rows = sum(rows[first + 1 :])
    steady_s = arrivals[-1] - arrivals[first]
    return {
        "concurrency": concurrency,
        "clips": int(sum(rows)),
        "total_s": round(total, 2),
        "first_batch_s": round(arrivals[0] - start, 2),
        "steady_clips_per_s": round(steady_rows / steady_s, 3) if steady_s > 0 and steady_rows else None,
        "steady_clips_per_cpu_s": round(steady_rows / sum(cpu[first + 1 :]), 3) if steady_rows else None,
        "failed": failed,
    }


def debian_job(cache_dir: Path, seconds: float, concurrency: int) -> dict:
    """The real content job on the Warzone 2100 soundtrack (30 human-made tracks)."""
    from app.config import settings_from_args
    from app.data.audio_catalog import debian_music_catalog, write_catalog
    from jobs.embed_content import embed_content

    state = Path(tempfile.mkdtemp(prefix="echotune-audio-bench-"))
    catalog = write_catalog(debian_music_catalog("warzone2100-music", cache_dir), state / "warzone.parquet")
    settings = settings_from_args(
        {
            "paths": {"state_dir": str(state), "cache_dir": str(cache_dir)},
            "content": {"analysis_seconds": seconds, "concurrency": concurrency, "cpus_per_actor": 1, "batch_size": 4, "embedding_dim": 8},
        }
    )
    summary = embed_content(settings, catalog)
    return {k: summary[k] for k in ("tracks", "audio_ok", "audio_failed", "truncated", "tracks_per_s", "explained_variance")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("ECHOTUNE_CACHE", "~/.cache/echotune")).expanduser())
    parser.add_argument("--seconds", type=float, default=30.0, help="analysis window per clip")
    parser.add_argument("--repeat", type=int, default=3, help="times the 28 clips are run through Ray Data")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--debian", action="store_true", help="also run the content job on the Warzone 2100 soundtrack")
    args = parser.parse_args()

    catalog = immich_music_catalog(args.cache_dir)
    print(f"{len(catalog)} labelled clips, {catalog['mood'].nunique()} moods, analysis window {args.seconds:.0f} s")

    start = time.perf_counter()
    analyse_tracks(catalog.iloc[:1], SR, args.seconds)
    warmup_s = time.perf_counter() - start
    print(f"warm-up (numba compile or cache load + first clip): {warmup_s:.1f} s")

    analysis = analyse_tracks(catalog, SR, args.seconds)  # the job's own per-track code, for accuracy
    plain = plain_loop(catalog, args.seconds)
    plain_rate = plain["clips_per_s"]
    print(
        f"plain loop: {plain_rate:.2f} clips/s wall, {plain['clips_per_cpu_s']:.2f} clips per CPU-second "
        f"(decode+resample {plain['decode_ms']:.0f} ms, features {plain['features_ms']:.0f} ms per clip, wall; CPU: "
        f"decode+downmix+resample {plain['decode_cpu_ms']:.0f} ms (libsndfile + soxr: {plain['libsndfile_soxr_decode_cpu_ms']:.0f} ms), "
        f"features {plain['features_cpu_ms']:.0f} ms)"
    )

    ok = analysis["error_reason"].isna().to_numpy()
    tempo_exact, tempo_octave = tempo_accuracy(analysis["tempo_bpm"], catalog["tempo_bpm"])
    key_acc = float((analysis["key"].to_numpy() == catalog["key"].to_numpy()).mean())
    key_mirex = float(np.mean([key_score(e, t) for e, t in zip(analysis["key"], catalog["key"])]))
    features = np.stack(analysis.loc[ok, "audio"].to_numpy())
    moods = mood_structure(features, catalog.loc[ok, "mood"].to_numpy())
    print(f"tempo within 4%: {tempo_exact:.3f} (within octave {tempo_octave:.3f}); key: {key_acc:.3f} (MIREX score {key_mirex:.3f}); {moods}")
    for row, truth in zip(analysis.itertuples(), catalog.itertuples()):
        print(f"  {truth.title:32s} tempo {row.tempo_bpm:6.1f} (label {truth.tempo_bpm:5.0f})  key {row.key!s:9s} (label {truth.key})")

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=max(args.concurrency), include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    clips = pd.concat([catalog.assign(track_id=catalog["track_id"] + f"#{i}") for i in range(args.repeat)], ignore_index=True)
    runs = []
    for concurrency in args.concurrency:
        result = ray_data_run(clips, args.seconds, concurrency, args.batch_size)
        runs.append(result)
        print(f"ray data: {result}")
    rate = {r["concurrency"]: r["steady_clips_per_s"] for r in runs}
    cpu_rate = {r["concurrency"]: r["steady_clips_per_cpu_s"] for r in runs}
    # Per core = clips per CPU-second of one actor: on a shared machine (see load_avg_1min) wall
    # time counts the neighbours' work too. The wall figures are reported beside it.
    per_core = cpu_rate.get(1)
    scaling = round(rate[2] / rate[1], 3) if rate.get(1) and rate.get(2) else None
    debian = debian_job(args.cache_dir, args.seconds, max(args.concurrency)) if args.debian else None
    if debian:
        print(f"content job on warzone2100-music: {debian}")
    ray.shutdown()

    failed = int((~ok).sum()) + sum(r["failed"] for r in runs)
    print(
        json.dumps(
            {
                "clips_per_s_per_core": per_core,
                "tempo_acc": round(tempo_exact, 3),
                "scaling_2_over_1": scaling,
                "failed": failed,
                "tempo_acc_octave": round(tempo_octave, 3),
                "key_acc": round(key_acc, 3),
                "key_mirex": round(key_mirex, 3),
                **moods,
                "warmup_s": round(warmup_s, 2),
                "plain_loop_clips_per_s": round(plain_rate, 3),
                "clips_per_s_per_core_wall": rate.get(1),
                "ray_c1_over_plain_wall": round(rate[1] / plain_rate, 3) if rate.get(1) else None,
                "ray_c1_over_plain_cpu": round(per_core / plain["clips_per_cpu_s"], 3) if per_core else None,
                "per_actor_cpu_efficiency_2_over_1": round(cpu_rate[2] / cpu_rate[1], 3) if cpu_rate.get(1) and cpu_rate.get(2) else None,
                "plain_loop_clips_per_cpu_s": round(plain["clips_per_cpu_s"], 3),
                "decode_ms_per_clip": round(plain["decode_ms"], 1),
                "features_ms_per_clip": round(plain["features_ms"], 1),
                "libsndfile_soxr_decode_cpu_ms_per_clip": round(plain["libsndfile_soxr_decode_cpu_ms"], 1),
                "decode_cpu_ms_per_clip": round(plain["decode_cpu_ms"], 1),
                "features_cpu_ms_per_clip": round(plain["features_cpu_ms"], 1),
                "load_avg_1min": round(os.getloadavg()[0], 1),
                "clip_seconds": args.seconds,
                "steady_clips_per_s": {str(k): v for k, v in rate.items()},
                "ray_clips_per_cpu_s": {str(k): v for k, v in cpu_rate.items()},
                "debian_warzone2100": debian,
                "cpus_visible": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
