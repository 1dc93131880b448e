"""Experiment evaluation at scale: 10M simulated exposure-log rows through the evaluator's
Ray Data path, against a single-process pandas implementation of the same computation
(exposures, every per-user column, latency p95, coverage, daily series, then the same
statistics), plus the calibration figures (A/A false-positive rate, agreement with
scipy/statsmodels). Both sides' results are compared figure by figure (`results_identical`).
`ratio_vs_pandas` is on wall time (ours on 2 CPUs); on a shared machine a single-process peer
loses more wall time to other tenants than a 2-process one, so `cpu_ratio_vs_pandas` (CPU
seconds of pandas over CPU seconds of the driver and all Ray processes) is printed too, with
the load average before and after.

    .venv/bin/python benchmarks/experiments.py [--rows 10000000] [--aa 1000]

Last stdout line: one JSON object with rows_per_s, ratio_vs_pandas, aa_false_positive_rate,
max_abs_diff_vs_scipy.
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
import pyarrow.parquet as pq
from _cpu_time import cpu_seconds  # benchmarks/_cpu_time.py (this script's folder)


def pandas_peer(paths: list[str], catalogue: Path, experiment: str, variants: list[str], pre_period_ms: int):
    """The straightforward single-process version of everything the evaluator computes before
    its statistics: exposures (first exposure, users in two variants dropped), the per-user
    sums and distinct sessions in and before the experiment, intra-list diversity per
    recommendation, serving latency p95 and catalogue coverage per variant, and the daily
    series. Returns the same UserMetrics, so the same statistics run on it."""
    from app.experiments.metrics import DAY_MS, MAX_LATENCY_MS, UserMetrics

    cols = ["user_id", "track_id", "event_type", "timestamp", "duration_ms", "position", "recommendation_id", "experiment", "variant", "session_id"]
    df = pd.concat([pd.read_parquet(p, columns=cols) for p in paths], ignore_index=True)
    df["ts"] = (df["timestamp"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)  # epoch ms, whatever the unit
    imp = df[(df["event_type"] == "impression") & (df["experiment"] == experiment) & df["variant"].isin(variants)]
    first = imp.groupby(["user_id", "variant"], as_index=False)["ts"].min()
    n_var = first.groupby("user_id")["variant"].transform("size")
    conflicting = int(first.loc[n_var > 1, "user_id"].nunique())
    first = first[n_var == 1].rename(columns={"ts": "first_ms"}).set_index("user_id").sort_index()
    df = df.merge(first, left_on="user_id", right_index=True, suffixes=("_raw", ""))
    post = df["ts"] >= df["first_ms"]
    pre = (df["ts"] < df["first_ms"]) & (df["ts"] >= df["first_ms"] - pre_period_ms)
    etype, duration = df["event_type"], df["duration_ms"].fillna(0).astype(float)
    shown = (etype == "impression") & (df["experiment"] == experiment) & post
    play = etype == "play"
    sums = pd.DataFrame({
        "user_id": df["user_id"],
        "impressions": shown, "clicks": (etype == "click") & post, "plays": play & post,
        "likes": (etype == "like") & post, "skips": (etype == "skip") & post,
        "listen_ms": duration.where(play & post, 0.0), "pre_listen_ms": duration.where(play & pre, 0.0),
    }).groupby("user_id").sum().reindex(first.index, fill_value=0)
    sums["sessions"] = df[play & post].groupby("user_id")["session_id"].nunique().reindex(first.index, fill_value=0)
    sums["pre_sessions"] = df[play & pre].groupby("user_id")["session_id"].nunique().reindex(first.index, fill_value=0)
    sums["clicked"] = sums["clicks"] > 0

    tracks = pd.read_parquet(catalogue, columns=["track_id", "genre"])
    impressions = df.loc[shown, ["user_id", "variant", "track_id", "recommendation_id", "position", "duration_ms"]]
    impressions = impressions.merge(tracks, on="track_id", how="left")
    per_rec = impressions.groupby(["recommendation_id", "user_id", "genre"], dropna=False).size().rename("c").reset_index()
    per_rec["pairs"] = per_rec["c"] * (per_rec["c"] - 1)
    lists = per_rec.groupby(["recommendation_id", "user_id"])[["c", "pairs"]].sum()
    lists = lists[lists["c"] >= 2]
    lists["ild"] = 1 - lists["pairs"] / (lists["c"] * (lists["c"] - 1))
    by_user = lists.groupby("user_id")["ild"].agg(["size", "sum"]).reindex(first.index, fill_value=0)
    sums["recs"], sums["ild_sum"] = by_user["size"], by_user["sum"]

    first_items = impressions[impressions["position"] == 0]
    latency = {v: float(np.quantile(first_items.loc[first_items["variant"] == v, "duration_ms"].clip(0, MAX_LATENCY_MS), 0.95, method="inverted_cdf"))
               for v in variants}
    known = impressions[impressions["track_id"].isin(tracks["track_id"])]
    coverage = {v: known.loc[known["variant"] == v, "track_id"].nunique() / len(tracks) for v in variants}
    daily = pd.DataFrame({"variant": df["variant"], "day": df["ts"] // DAY_MS, "impressions": shown, "clicks": (etype == "click") & post,
                          "plays": play & post, "listen_ms": duration.where(play & post, 0.0)})[post]
    daily = daily.groupby(["variant", "day"], as_index=False).sum().sort_values(["day", "variant"]).reset_index(drop=True)
    return UserMetrics(
        variants=list(variants),
        variant_idx=first["variant"].map({v: i for i, v in enumerate(variants)}).to_numpy(np.int64),
        columns={c: sums[c].to_numpy(float) for c in sums.columns},
        latency_p95_ms=latency,
        coverage=coverage,
        daily=daily,
        conflicting_users=conflicting,
        has_pre_period=bool(sums["pre_listen_ms"].any() or sums["pre_sessions"].any()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--aa", type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from app.experiments import stats as st
    from app.experiments.definitions import Experiment, Variant
    from app.experiments.evaluation import evaluate
    from app.experiments.simulate import Effect, EventSimulation, simulate_ctr_arms, simulate_events
    from jobs.evaluate_experiment import compute_user_metrics

    # 1. Agreement with scipy / statsmodels on one data set.
    from scipy import stats
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.proportion import proportions_ztest

    rng = np.random.default_rng(0)
    a, b = rng.gamma(2, 3, 5000), rng.gamma(2, 3.1, 5000)
    ours = st.welch_t(a, b)
    ref = stats.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(0.95)
    z, p = proportions_ztest([530, 480], [10_000, 10_000])
    two = st.two_proportion_z(480, 10_000, 530, 10_000)
    ps = rng.uniform(0, 0.2, 12)
    srm, srm_ref = st.srm_chi_square([5050, 4950], [1, 1]), stats.chisquare([5050, 4950])
    diffs = [ours.statistic - ref.statistic, ours.p_value - ref.pvalue, ours.abs_ci[0] - ci.low, ours.abs_ci[1] - ci.high, two.statistic - z, two.p_value - p,
             srm.p_value - srm_ref.pvalue, *(np.asarray(st.holm(ps.tolist())) - multipletests(ps, method="holm")[1]),
             *(np.asarray(st.benjamini_hochberg(ps.tolist())) - multipletests(ps, method="fdr_bh")[1])]
    max_diff = float(np.max(np.abs(diffs)))
    print(f"max |ours - scipy/statsmodels| over {len(diffs)} figures: {max_diff:.2e}")

    # 2. A/A false-positive rate (delta-method CTR test) and power on a known effect.
    t0 = time.perf_counter()
    aa_rng = np.random.default_rng(2026)
    fp = np.mean([st.ratio_delta(c.clicks, c.impressions, t.clicks, t.impressions).p_value < 0.05 for c, t in (simulate_ctr_arms(aa_rng, 1500, 0.05) for _ in range(args.aa))])
    n = st.users_per_arm_for_power(0.05, 0.0575)
    detected = np.mean([st.two_proportion_z(aa_rng.binomial(n, 0.05), n, aa_rng.binomial(n, 0.0575), n).p_value < 0.05 for _ in range(1000)])
    print(f"A/A false-positive rate over {args.aa} experiments at alpha 0.05: {fp:.3f}  ({time.perf_counter() - t0:.1f}s)")
    print(f"power: design 0.80 at n={n}/arm for 5% -> 5.75%, detected in {detected:.3f} of 1000 runs")

    # 3. Throughput: simulated exposure log, Ray Data evaluator vs single-process pandas.
    per_user = 3 * 10 + 3 * 0.5 + 24 * 1.35  # impressions + clicks + plays/likes/skips, pre and post
    sim = EventSimulation(experiment="bench", n_users=max(1000, int(args.rows / per_user)), effects={"treatment": Effect(ctr=0.05)}, seed=1)
    t0 = time.perf_counter()
    events, catalogue = simulate_events(sim)
    tmp = Path(tempfile.mkdtemp(prefix="exp-bench-"))
    n_files = 8
    step = -(-events.num_rows // n_files)
    paths = []
    for i in range(n_files):
        path = tmp / f"part-{i}.parquet"
        pq.write_table(events.slice(i * step, step), path)
        paths.append(str(path))
    pq.write_table(catalogue, tmp / "tracks.parquet")
    rows = events.num_rows
    print(f"simulated {rows:,} rows for {sim.n_users:,} users in {time.perf_counter() - t0:.1f}s")
    del events

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=1_000_000_000, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    exp = Experiment(name="bench", variants=[Variant(name="control", weight=1), Variant(name="treatment", weight=1)])
    pre_ms = 7 * 86_400_000
    compute_user_metrics(paths[:2], exp, tmp / "tracks.parquet", pre_ms, rows_per_task=1)  # warm both workers (one task per file)
    load_before = os.getloadavg()[0]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    users = compute_user_metrics(paths, exp, tmp / "tracks.parquet", pre_ms)
    result = evaluate(users, exp)
    ray_s, ray_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    ray.shutdown()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    peer = pandas_peer(paths, tmp / "tracks.parquet", "bench", [v.name for v in exp.variants], pre_ms)
    peer_result = evaluate(peer, exp)
    pandas_s, pandas_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    load_after = os.getloadavg()[0]

    # Both computed the same thing: every per-user column, the descriptive figures, the daily
    # series and every statistic must agree.
    same_columns = sorted(users.columns) == sorted(peer.columns) and all(np.allclose(users.columns[c], peer.columns[c]) for c in users.columns)
    same_figures = users.latency_p95_ms == peer.latency_p95_ms and all(np.isclose(users.coverage[v], peer.coverage[v]) for v in users.variants)
    same_daily = np.allclose(users.daily[["day", "impressions", "clicks", "plays", "listen_ms"]].to_numpy(float), peer.daily[["day", "impressions", "clicks", "plays", "listen_ms"]].to_numpy(float))
    stat_diff = max(
        (abs(getattr(a.comparison, f) - getattr(b.comparison, f)) for a, b in zip(result.results, peer_result.results) if a.comparison and b.comparison
         for f in ("statistic", "p_value", "p_adjusted", "abs_lift", "rel_lift")),
        default=0.0,
    )
    same = bool(same_columns and same_figures and same_daily and stat_diff < 1e-9)
    print(f"evaluator (Ray Data, 2 CPUs, {len(users.columns)} per-user columns, 9 metrics + statistics): {ray_s:.1f}s = {rows / ray_s:,.0f} rows/s, CPU {ray_cpu:.1f}s")
    print(f"pandas single process (the same: {len(peer.columns)} per-user columns, 9 metrics + statistics): {pandas_s:.1f}s = {rows / pandas_s:,.0f} rows/s, CPU {pandas_cpu:.1f}s")
    print(f"identical: columns {same_columns}, latency/coverage {same_figures}, daily {same_daily}, max statistic diff {stat_diff:.1e}; "
          f"CTR lift {result.get('treatment', 'ctr').comparison.rel_lift:+.2%} (true +5%); load average {load_before:.1f} -> {load_after:.1f}")
    print(json.dumps({
        "rows": rows,
        "seconds": round(ray_s, 2),
        "rows_per_s": round(rows / ray_s),
        "cpu_seconds": round(ray_cpu, 2),
        "pandas_seconds": round(pandas_s, 2),
        "pandas_rows_per_s": round(rows / pandas_s),
        "ratio_vs_pandas": round(pandas_s / ray_s, 3),
        "pandas_cpu_seconds": round(pandas_cpu, 2),
        "cpu_ratio_vs_pandas": round(pandas_cpu / ray_cpu, 3),
        "results_identical": bool(same),
        "aa_false_positive_rate": round(float(fp), 4),
        "power_design": 0.8,
        "power_observed": round(float(detected), 3),
        "max_abs_diff_vs_scipy": max_diff,
        "load_average": [round(load_before, 1), round(load_after, 1)],
    }))


if __name__ == "__main__":
    main()
