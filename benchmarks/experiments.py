"""Experiment evaluation at scale: 10M simulated exposure-log rows through the evaluator's
Ray Data path, against a single-process pandas implementation of the same per-user metrics,
plus the calibration figures (A/A false-positive rate, agreement with scipy/statsmodels).

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


def pandas_peer(paths: list[str], experiment: str) -> pd.DataFrame:
    """The straightforward single-process version: read everything, group by user."""
    df = pd.concat([pd.read_parquet(p, columns=["user_id", "event_type", "timestamp", "duration_ms", "experiment", "variant", "session_id"]) for p in paths], ignore_index=True)
    df["ts"] = (df["timestamp"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)  # epoch ms, whatever the unit
    imp = df[(df["event_type"] == "impression") & (df["experiment"] == experiment)]
    first = imp.groupby("user_id").agg(first_ms=("ts", "min"), variant=("variant", "first"), n_var=("variant", "nunique"))
    first = first[first["n_var"] == 1]
    df = df.merge(first[["first_ms", "variant"]], left_on="user_id", right_index=True, suffixes=("_raw", ""))
    post = df[df["ts"] >= df["first_ms"]]
    g = post.assign(
        impressions=(post["event_type"] == "impression") & (post["experiment"] == experiment),
        clicks=post["event_type"] == "click",
        plays=post["event_type"] == "play",
        likes=post["event_type"] == "like",
        skips=post["event_type"] == "skip",
        listen_ms=np.where(post["event_type"] == "play", post["duration_ms"].fillna(0), 0),
    ).groupby("user_id")[["impressions", "clicks", "plays", "likes", "skips", "listen_ms"]].sum()
    sessions = post[post["event_type"] == "play"].groupby("user_id")["session_id"].nunique().rename("sessions")
    return first[["variant"]].join(g).join(sessions).fillna(0)


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

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=1_000_000_000)
    exp = Experiment(name="bench", variants=[Variant(name="control", weight=1), Variant(name="treatment", weight=1)])
    compute_user_metrics(paths[:1], exp, tmp / "tracks.parquet", 7 * 86_400_000)  # warm the workers
    t0 = time.perf_counter()
    users = compute_user_metrics(paths, exp, tmp / "tracks.parquet", 7 * 86_400_000)
    result = evaluate(users, exp)
    ray_s = time.perf_counter() - t0
    ray.shutdown()
    t0 = time.perf_counter()
    peer = pandas_peer(paths, "bench")
    pandas_s = time.perf_counter() - t0

    # Both must agree on what they both compute.
    order = np.argsort(peer.index.to_numpy())
    same = all(np.allclose(peer[c].to_numpy(float)[order], users.columns[c]) for c in ["impressions", "clicks", "plays", "likes", "skips", "listen_ms", "sessions"])
    print(f"evaluator (Ray Data, 2 CPUs, all 9 metrics + statistics): {ray_s:.1f}s = {rows / ray_s:,.0f} rows/s")
    print(f"pandas single process (7 per-user sums only, no statistics): {pandas_s:.1f}s = {rows / pandas_s:,.0f} rows/s")
    print(f"per-user sums identical: {same}; CTR lift {result.get('treatment', 'ctr').comparison.rel_lift:+.2%} (true +5%)")
    print(json.dumps({
        "rows": rows,
        "seconds": round(ray_s, 2),
        "rows_per_s": round(rows / ray_s),
        "pandas_rows_per_s": round(rows / pandas_s),
        "ratio_vs_pandas": round(pandas_s / ray_s, 3),
        "results_identical": bool(same),
        "aa_false_positive_rate": round(float(fp), 4),
        "power_design": 0.8,
        "power_observed": round(float(detected), 3),
        "max_abs_diff_vs_scipy": max_diff,
    }))


if __name__ == "__main__":
    main()
