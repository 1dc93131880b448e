"""Serving latency while jobs publish models, against the same app while nothing is published.

    .venv/bin/python benchmarks/reload.py [--every 2] [--seconds 30] [--rounds 3] [--rate 50]

A serving replica reloads its model bundle when a job publishes a new version; it does so on
a background thread, beside the requests (app/refresh.py). This measures what a publish then
costs the requests: the benchmark world's app (benchmarks/serve.py's set-up and state folder,
its replicas looking for new versions every 2 s) takes open-loop load at `--rate` in two
phases that alternate `--rounds` times: quiet, and publishing, where a thread republishes the
trending artifact every `--every` seconds. A new trending version makes every replica reload
its whole bundle and changes nothing else about the requests (a new CF version would also
switch every listener to the fold-in until the next materialisation). Each phase's latencies
are pooled over its turns; the peer of the publishing phase is the quiet one, in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from deployments.runtime import serve_logging_config, wait_http  # no Ray import: safe before the env is set

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import load_test_env, local_system, pooled, prepare, run_load  # noqa: E402  benchmarks/serve.py


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=float, default=2.0, help="Seconds between publishes in the publishing phase.")
    parser.add_argument("--seconds", type=float, default=30.0, help="Seconds of load per phase, over all its turns.")
    parser.add_argument("--rounds", type=int, default=3, help="Turns each phase takes (latencies pooled).")
    parser.add_argument("--rate", type=float, default=50.0, help="Requests per second (open loop).")
    parser.add_argument("--state", type=Path, default=Path(tempfile.gettempdir()) / "echotune-bench-serve")
    args = parser.parse_args()
    load_test_env()  # before Ray Serve is imported

    import pandas as pd
    from ray import serve

    from app.artifacts import ArtifactStore
    from app.refresh import BackgroundRefresh
    from app.config import settings_from_args
    from deployments.app import build_app

    with local_system(args.state) as (_, port, app_args):
        serve.run(build_app(app_args), name="echotune", route_prefix="/", logging_config=serve_logging_config())
        wait_http(f"http://127.0.0.1:{port}/healthz")
        prepare(app_args, f"http://127.0.0.1:{port}")
        store = ArtifactStore(settings_from_args(app_args).paths.artifacts_dir)
        users = pd.read_parquet(args.state / "world" / "users.parquet")["user_id"].tolist()
        url = f"http://127.0.0.1:{port}/v1/users/{{user}}/recommendations?k=20"
        run_load("open", url, users, 20, 3)  # warm (numba, handles, connections)

        published: list[str] = []
        runs: dict[str, list[dict]] = {"quiet": [], "publishing": []}
        turn = args.seconds / args.rounds
        for _ in range(args.rounds):
            runs["quiet"].append(run_load("open", url, users, args.rate, turn))
            # The job side, on the same kind of thread the replicas reload on.
            publisher = BackgroundRefresh(lambda: published.append(store.republish("trending")), args.every, "publisher")
            publisher.start()
            runs["publishing"].append(run_load("open", url, users, args.rate, turn))
            publisher.stop()

    quiet, publishing = pooled(runs["quiet"]), pooled(runs["publishing"])
    for name, r in (("quiet", quiet), ("publishing", publishing)):
        print(f"{name:>10} @ {args.rate:.0f} req/s: p50 {r['p50_ms']:.1f} ms  p95 {r['p95_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
              f"ok {r['ok']}/{r['sent']}  errors {r['errors']}  CPU {r['cpu_ms_per_request']:.1f} ms/request")
    print(f"{len(published)} publishes, one every {args.every:g} s while publishing")
    print(json.dumps({
        "rate_rps": args.rate,
        "publish_every_s": args.every,
        "publishes": len(published),
        **{f"{q}_ms_{phase}": round(r[f"{q}_ms"], 2) for phase, r in (("quiet", quiet), ("publishing", publishing)) for q in ("p50", "p95", "p99")},
        "p95_ratio_publishing_vs_quiet": round(publishing["p95_ms"] / quiet["p95_ms"], 3),
        "p99_ratio_publishing_vs_quiet": round(publishing["p99_ms"] / quiet["p99_ms"], 3),
        "errors": quiet["errors"] + publishing["errors"],
    }))


if __name__ == "__main__":
    main()
