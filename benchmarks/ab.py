"""A/B of two settings of the app on one cluster, under the same open-loop load, with the bare chain.

    .venv/bin/python benchmarks/ab.py --b '{"serving": {"request_batch_size": 16}}' [--rounds 10] [--seconds 10] [--rate 50]

Two runs of benchmarks/serve.py minutes apart can differ by more than the change being
measured: the machine's other tenants come and go. Here copy A (the benchmark's settings) and
copy B (the same with `--b`'s overrides merged in) are deployed side by side with the bare
chain, and the three take turns at `--rate` requests/s, `--rounds` times, the order reversed
every other round, so drift hits all three alike. It prints each copy's latency quantiles and
their gap to the bare chain's at the same quantile, and B's p95 against A's with a 95%
interval (serve.py's `ratio_interval`). Both copies share the cluster's idle load, so their
p95s run higher than in serve.py; compare them with each other. Without `--b` the two copies
are the same (an A/A run, what `make bench` does): how far its ratio strays from 1 is the
method's own noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from deployments.runtime import serve_logging_config, wait_http  # no Ray import: safe before the env is set

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import bare_chain_app, load_test_env, local_system, prepare, ratio_interval, run_load  # noqa: E402  benchmarks/serve.py

QUANTILES = (10, 50, 75, 90, 95, 99)


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in, nested mappings key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--b", default="{}", help="JSON of app args overrides for copy B; none (the default) is an A/A run.")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="Seconds per turn.")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--state", type=Path, default=Path(tempfile.gettempdir()) / "echotune-bench-serve")
    args = parser.parse_args()
    overrides = json.loads(args.b)
    load_test_env()  # before Ray Serve is imported

    import pandas as pd
    from ray import serve

    from deployments.app import build_app

    with local_system(args.state) as (_, port, app_args):
        logging_config = serve_logging_config()
        serve.run(build_app(app_args), name="a", route_prefix="/", logging_config=logging_config)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        prepare(app_args, f"http://127.0.0.1:{port}")
        serve.run(build_app(merged(app_args, overrides)), name="b", route_prefix="/b", logging_config=logging_config)
        serve.run(bare_chain_app(), name="bare", route_prefix="/bare", logging_config=logging_config)
        users = pd.read_parquet(args.state / "world" / "users.parquet")["user_id"].tolist()
        urls = {
            name: f"http://127.0.0.1:{port}{prefix}/v1/users/{{user}}/recommendations?k=20"
            for name, prefix in (("bare", "/bare"), ("a", ""), ("b", "/b"))
        }
        for url in urls.values():
            wait_http(url.format(user=users[0]))
            run_load("open", url, users, 20, 3)  # warm: numba, handles, connections

        latencies: dict[str, list[float]] = {name: [] for name in urls}
        errors = {name: 0 for name in urls}
        for r in range(args.rounds):
            order = ["bare", "a", "b"] if r % 2 == 0 else ["bare", "b", "a"]
            for name in order:
                result = run_load("open", urls[name], users, args.rate, args.seconds)
                latencies[name] += [x * 1000 for x in result["latencies_s"]]
                errors[name] += result["errors"]
            print(f"round {r}: p95 " + "  ".join(f"{n} {np.percentile(latencies[n][-int(args.rate * args.seconds):], 95):.2f}" for n in urls) + " ms")

    q = {name: {p: float(np.percentile(latencies[name], p)) for p in QUANTILES} for name in urls}
    for name in ("a", "b"):
        gaps = "  ".join(f"p{p} {q[name][p] - q['bare'][p]:+.2f}" for p in QUANTILES)
        print(f"{name}: p50 {q[name][50]:.2f} p95 {q[name][95]:.2f} ms; gap to the bare chain's: {gaps} ms")
    low, high = ratio_interval(latencies["b"], latencies["a"])
    ratio = q["b"][95] / q["a"][95]
    print(f"B's p95 against A's: {ratio:.3f} (95% interval {low:.3f}-{high:.3f})")
    print(json.dumps({
        "b_overrides": overrides, "rate_rps": args.rate, "rounds": args.rounds, "seconds_per_turn": args.seconds,
        "p95_ms_a": round(q["a"][95], 2), "p95_ms_b": round(q["b"][95], 2), "bare_p95_ms": round(q["bare"][95], 2),
        "p95_ratio_b_vs_a": round(ratio, 3), "p95_ratio_b_vs_a_ci95": [round(low, 3), round(high, 3)],
        "p95_ratio_a_vs_bare": round(q["a"][95] / q["bare"][95], 3), "p95_ratio_b_vs_bare": round(q["b"][95] / q["bare"][95], 3),
        "gap_ms_a": {f"p{p}": round(q["a"][p] - q["bare"][p], 2) for p in QUANTILES},
        "gap_ms_b": {f"p{p}": round(q["b"][p] - q["bare"][p], 2) for p in QUANTILES},
        "errors_a": errors["a"], "errors_b": errors["b"], "bare_errors": errors["bare"],
    }))


if __name__ == "__main__":
    main()
