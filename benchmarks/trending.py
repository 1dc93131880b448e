"""Trending: quality on simulated worlds with known breakouts, and aggregation throughput.

    .venv/bin/python benchmarks/trending.py                  # 10M events, 6 worlds of each kind
    .venv/bin/python benchmarks/trending.py --events 2000000 --seeds 2

Quality: for each seed, a default-sized world with 5 breakouts, scored at its end: precision
and recall of the breakouts in the published top-k (micro-averaged over worlds), and whether
the brand-new breakout (released hours before it took off) was caught. The same seeds with
n_breakouts=0 are scored at 6 times over their last day, with smoothing state carried from run
to run as the job does: every listed track is a false trend.

Throughput: a synthetic 10M-event log (Zipf track popularity, 10 locales, 8 days) in Parquet
files; the job's Ray Data aggregation (read + map_batches + combine) against a single-process
pandas implementation of the same counts, each run twice in the same run (every run printed,
the best of each side reported). Per core, two ways: `events_per_s_per_core` = events /
(wall seconds x Ray's CPUs), and `events_per_cpu_s` = events / CPU seconds used by the driver
and every Ray process (psutil, user + system), which other tenants' load on a shared machine
does not inflate. Load averages are recorded with each run.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from _cpu_time import cpu_seconds  # benchmarks/_cpu_time.py (this script's folder)

from app.config import TrendingSettings, WorldSettings
from app.data.world import generate_world, load_world
from app.trending.aggregate import HOUR_MS
from app.trending.ranking import empty_state, smooth
from training.trending import baseline_for, to_now_ms, trending_scores

NULL_RUN_HOURS = (20, 16, 12, 8, 4, 0)


def quality(seeds: list[int], settings: TrendingSettings, root: Path) -> dict:
    tp = listed = n_breakouts = new_hit = 0
    false_runs: list[int] = []
    for seed in seeds:
        world = load_world(generate_world(WorldSettings(seed=seed), root / f"b{seed}", audio=False).root)
        end = pd.Timestamp(world.settings.end)
        top = trending_scores(world.events, end, settings, tracks=world.tracks)
        truth = set(world.breakouts["track_id"])
        hits = set(top["track_id"]) & truth
        tp, listed, n_breakouts = tp + len(hits), listed + len(top), n_breakouts + len(truth)
        new_hit += world.breakouts["track_id"].iloc[0] in hits
        print(f"seed {seed}: {len(top)} listed, {len(hits)}/{len(truth)} breakouts; "
              f"false: {sorted(set(top['track_id']) - truth)}", flush=True)

        null = load_world(generate_world(WorldSettings(seed=seed, n_breakouts=0), root / f"n{seed}", audio=False).root)
        state = empty_state()
        for hours in NULL_RUN_HOURS:
            now = pd.Timestamp(null.settings.end) - pd.Timedelta(hours=hours)
            listed_now = trending_scores(null.events, now, settings, tracks=null.tracks)
            _, state = smooth(listed_now, state, "global", to_now_ms(now), settings.smoothing_half_life_hours)
            false_runs.append(len(listed_now))
        print(f"seed {seed} null world: false trends per run {false_runs[-len(NULL_RUN_HOURS):]}", flush=True)
    return {
        "precision": round(tp / listed, 4) if listed else 0.0,
        "recall": round(tp / n_breakouts, 4) if n_breakouts else 0.0,
        "new_track_detected": f"{new_hit}/{len(seeds)}",
        "false_trends_null": round(float(np.mean(false_runs)), 4),
        "worlds": len(seeds),
        "null_runs": len(false_runs),
    }


def synthetic_events(n: int, out: Path, n_files: int = 20, n_tracks: int = 20_000, days: int = 8, seed: int = 0) -> tuple[list[str], int]:
    """n events over `days` in n_files Parquet files, like the exported event log."""
    rng = np.random.default_rng(seed)
    end_ms = 1_793_491_200_000
    tracks = np.array([f"t{i:06d}" for i in range(n_tracks)])
    p = (np.arange(1, n_tracks + 1) ** -1.0)
    p /= p.sum()
    locales = np.array(["en-US", "en-GB", "de-DE", "fr-FR", "es-ES", "es-MX", "pt-BR", "ja-JP", "sv-SE", "en-IN"])
    types = np.array(["play", "skip", "like", "dislike"])
    files = []
    per = n // n_files
    for f in range(n_files):
        m = per if f < n_files - 1 else n - per * (n_files - 1)
        ts = np.sort(rng.integers(end_ms - days * 24 * HOUR_MS, end_ms, m))
        table = pa.table(
            {
                "track_id": pa.array(tracks[rng.choice(n_tracks, m, p=p)]),
                "event_type": pa.array(types[rng.choice(4, m, p=[0.7, 0.2, 0.08, 0.02])]),
                "timestamp": pa.array(ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
                "locale": pa.array(locales[rng.integers(0, len(locales), m)]),
            }
        )
        path = out / f"part-{f:03d}.parquet"
        pq.write_table(table, path)
        files.append(str(path))
    return files, end_ms


def pandas_counts(files: list[str], now_ms: int, settings: TrendingSettings, horizon: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same counts as the job's aggregation, in one process with pandas."""
    events = pd.read_parquet(files, columns=["track_id", "event_type", "timestamp", "locale"])
    ts = events["timestamp"].astype("int64").to_numpy() // 1_000 if events["timestamp"].dtype.unit == "us" else (
        events["timestamp"].astype("int64").to_numpy() // (1 if events["timestamp"].dtype.unit == "ms" else 1_000_000)
    )
    age = (now_ms - ts) // HOUR_MS
    weight = events["event_type"].map(dict(settings.event_weights)).fillna(0.0).to_numpy()
    past = age >= 0
    frame = pd.DataFrame({"track_id": events["track_id"].to_numpy()[past], "bucket": np.minimum(age[past], horizon),
                          "weight": weight[past], "ts": ts[past], "locale": events["locale"].to_numpy()[past]})
    hourly = frame.groupby(["track_id", "bucket"], sort=False).agg(weight=("weight", "sum"), events=("weight", "size"), first_ms=("ts", "min"))
    local = frame[(frame["weight"] > 0) & (frame["bucket"] < horizon)]
    local = local.assign(block=local["bucket"] // settings.window_hours).groupby(["track_id", "locale", "block"], sort=False)["weight"].agg(["sum", "size"])
    return hourly, local


def throughput(n_events: int, settings: TrendingSettings, root: Path, repeats: int = 2) -> dict:
    import ray

    from jobs.trending import aggregate_events

    out = root / "events"
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    files, end_ms = synthetic_events(n_events, out)
    print(f"wrote {n_events:,} synthetic events in {time.perf_counter() - t:.1f}s", flush=True)
    horizon = baseline_for(settings).horizon
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        aggregate_events(files[:2], end_ms, settings, horizon, rows_per_task=1)  # warm both workers (one task per file)
        cores = int(ray.cluster_resources().get("CPU", 1))
        runs = []
        for _ in range(repeats):
            load = os.getloadavg()[0]
            cpu, t = cpu_seconds(), time.perf_counter()
            combined = aggregate_events(files, end_ms, settings, horizon)
            runs.append((time.perf_counter() - t, cpu_seconds() - cpu, load))
    finally:
        ray.shutdown()
    peer_runs = []
    for _ in range(repeats):
        load = os.getloadavg()[0]
        cpu, t = cpu_seconds(), time.perf_counter()
        hourly, local = pandas_counts(files, end_ms, settings, horizon)
        peer_runs.append((time.perf_counter() - t, cpu_seconds() - cpu, load))
    hourly_rows = int(np.sum(np.asarray(combined["kind"]) == 0))
    assert hourly_rows == len(hourly), (hourly_rows, len(hourly))  # same computation, same answer
    for i, (wall, cpu_s, run_load) in enumerate(runs):
        print(f"Ray Data run {i + 1}: {wall:.2f}s wall, {cpu_s:.2f}s CPU ({n_events / wall:,.0f} events/s; per core: "
              f"{n_events / (wall * cores):,.0f} by wall x {cores} cores, {n_events / cpu_s:,.0f} by CPU time); load average {run_load:.1f}", flush=True)
    for i, (wall, cpu_s, run_load) in enumerate(peer_runs):
        print(f"pandas run {i + 1}: {wall:.2f}s wall, {cpu_s:.2f}s CPU ({n_events / wall:,.0f} events/s); load average {run_load:.1f}", flush=True)
    (ray_s, ray_cpu, _), (pandas_s, pandas_cpu, _) = min(runs), min(peer_runs)
    eps = n_events / ray_s
    print(f"best of {repeats}: Ray Data {ray_s:.2f}s, pandas {pandas_s:.2f}s, ratio {pandas_s / ray_s:.2f}x", flush=True)
    return {"events": n_events, "events_per_s": round(eps), "events_per_s_per_core": round(eps / cores), "events_per_cpu_s": round(n_events / ray_cpu),
            "cores": cores, "seconds": round(ray_s, 2), "cpu_seconds": round(ray_cpu, 2), "pandas_seconds": round(pandas_s, 2),
            "ratio_vs_pandas": round(pandas_s / ray_s, 3), "cpu_ratio_vs_pandas": round(pandas_cpu / ray_cpu, 3), "load_average": [round(r[2], 1) for r in runs + peer_runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--seeds", type=int, default=6, help="worlds of each kind (with and without breakouts)")
    args = parser.parse_args()
    settings = TrendingSettings()
    root = Path(tempfile.mkdtemp(prefix="trending-bench-"))
    try:
        # Seeds 101+: the defaults were tuned on seeds 1-6, so these worlds are held out.
        result = quality(list(range(101, 101 + args.seeds)), settings, root)
        result |= throughput(args.events, settings, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
