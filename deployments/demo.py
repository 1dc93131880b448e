"""Run the whole system locally: `make demo` (start) and `make stop` (stop from another shell).

    python -m deployments.demo [--config ray_config.yaml]      # start, keep serving until Ctrl-C
    python -m deployments.demo stop                            # stop Serve, Ray and Redis

What it does, each step real: start a redis-server (unless `redis.url` is set), start a local
Ray cluster with its dashboard on 127.0.0.1:8265, generate the simulated world, `serve deploy`
the config, POST the world's listening events to the gateway over HTTP, then submit the jobs
to the cluster with `ray job submit` semantics (the Job Submission API): export → content,
CF and trending in parallel → materialise. Then print where everything is and wait.

Ray 2.60 turns on token authentication by default; this local demo starts the cluster with
RAY_AUTH_MODE=disabled so the dashboard, `serve` and `ray job submit` work without a token.
Do not do that on a shared network: use token auth (RAY_AUTH_MODE=token) there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.config import Settings, load_settings
from app.redis_server import EmbeddedRedis, registered_server, stop_registered
from deployments.runtime import apply_cluster_env, wait_http

log = logging.getLogger("echotune.demo")

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = "http://127.0.0.1:8265"
METRICS_PORT = 8080  # Ray's default, spelled out so the printed URL is the real one
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Serve's high-throughput mode behind HAProxy, and the malloc arena cap, for every process of
# the cluster (deployments/runtime.py says why).
apply_cluster_env(os.environ)
# Processes started by `ray start` (and so the drivers of submitted jobs) inherit this PATH:
# `ray job submit -- python -m jobs.x` then runs this environment's python, with EchoTune.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _bin(name: str) -> str:
    """The `ray`/`serve` console script of this interpreter's environment."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name) or name


def _run(*cmd: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess | None:
    """Run a CLI in its own session: Ctrl-C in the demo's terminal must reach the demo, which
    then stops things in order, not the Ray daemons `ray start` leaves behind."""
    log.info("$ %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, check=check, cwd=ROOT, env=os.environ.copy(), start_new_session=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s did not finish within %ss", cmd[0], timeout)
        return None


def ray_temp_dir(settings: Settings) -> Path:
    """The demo cluster's own session folder. `ray stop` kills every Ray process on the
    machine; stopping only the processes that name this folder leaves other clusters alone."""
    return settings.paths.state_dir / "ray"


def start_ray(settings: Settings) -> None:
    _run(
        _bin("ray"), "start", "--head",
        "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--include-dashboard=true",
        "--num-cpus=2", "--disable-usage-stats", f"--metrics-export-port={METRICS_PORT}", f"--temp-dir={ray_temp_dir(settings)}",
    )


def stop_demo(settings: Settings, timeout_s: float = 60) -> None:
    """`make stop`: ask a running demo to shut down in order, then sweep whatever is left."""
    pid_file = settings.paths.state_dir / "demo.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.5)
        except ProcessLookupError:
            pass
        pid_file.unlink(missing_ok=True)
    stop_all(settings)
    left = _cluster_pids(ray_temp_dir(settings))
    if left:
        log.warning("processes of the demo's Ray cluster still running: %s", left)
    else:
        log.info("the demo is stopped")


def _cluster_pids(temp_dir: Path) -> list[int]:
    """Processes of the demo's cluster: those naming its temp dir on their command line, and
    those writing logs into it (Ray's agents rename themselves to `ray::DashboardAgent`, so
    only their open log files say which cluster they belong to)."""
    marker = str(temp_dir)
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes() or _writes_into(proc, marker):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _writes_into(proc: Path, folder: str) -> bool:
    for fd in (proc / "fd").iterdir():
        try:
            if os.readlink(fd).startswith(folder):
                return True
        except OSError:
            continue
    return False


def stop_ray(settings: Settings, timeout_s: float = 20) -> None:
    temp_dir = ray_temp_dir(settings)
    if not _cluster_pids(temp_dir):
        return  # the demo already stopped its cluster in order
    _run(_bin("serve"), "shutdown", "-y", "--address", DASHBOARD, check=False, timeout=60)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _cluster_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.5)
            pids = _cluster_pids(temp_dir)
        if not pids:
            log.info("stopped the demo's Ray cluster")
            return


def stop_all(settings: Settings) -> None:
    stop_ray(settings)
    if stop_registered(settings.paths.redis_dir):
        log.info("stopped redis-server")


def ensure_world(settings: Settings) -> Path:
    from app.data.world import generate_world

    marker = settings.paths.world_dir / "world-settings.json"
    wanted = settings.world.model_dump_json()
    if marker.exists() and marker.read_text() == wanted:
        log.info("world already generated in %s", settings.paths.world_dir)
    else:
        start = time.perf_counter()
        generate_world(settings.world, settings.paths.world_dir)
        marker.write_text(wanted)
        log.info("generated world in %.1fs", time.perf_counter() - start)
    return settings.paths.world_dir


def post_world_events(api: str, world_dir: Path, batch: int, api_key: str) -> int:
    """The simulated listeners' clients: send every event over HTTP, in batches."""
    import pandas as pd

    events = pd.read_parquet(world_dir / "events.parquet")
    events["timestamp"] = events["timestamp"].map(lambda t: t.isoformat())
    cols = ["event_id", "user_id", "track_id", "event_type", "timestamp", "session_id", "duration_ms", "locale"]
    cols = [c for c in cols if c in events]
    accepted = 0
    with httpx.Client(base_url=api, timeout=60, headers={"Authorization": f"Bearer {api_key}"}) as client:
        for start in range(0, len(events), batch):
            chunk = events.iloc[start : start + batch][cols].to_dict("records")
            resp = client.post("/v1/events", json={"events": chunk})
            resp.raise_for_status()
            accepted += resp.json()["accepted"]
    return accepted


def submit_and_wait(client, names: list[str], config: str) -> dict[str, str]:
    """Submit jobs at once (so they run in parallel) and wait for all of them."""
    from ray.job_submission import JobStatus

    ids = {
        name: client.submit_job(
            entrypoint=f"{sys.executable} -m jobs.{name} --config {config}",
            runtime_env={"working_dir": str(ROOT)},
            submission_id=f"{name}-{int(time.time())}",
        )
        for name in names
    }
    log.info("submitted %s", ", ".join(ids.values()))
    done: dict[str, str] = {}
    while len(done) < len(ids):
        for name, job_id in ids.items():
            if name in done:
                continue
            status = client.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                done[name] = status.value
                tail = client.get_job_logs(job_id).strip().splitlines()[-1:]
                log.info("job %s: %s %s", job_id, status.value, tail[0] if tail else "")
        time.sleep(1)
    failed = [n for n, s in done.items() if s != "SUCCEEDED"]
    if failed:
        raise RuntimeError(f"jobs failed: {failed}; see {DASHBOARD}/#/jobs")
    return done


def demo(config: str) -> None:
    from ray.job_submission import JobSubmissionClient

    settings = load_settings(config)
    t0 = time.perf_counter()
    settings.paths.state_dir.mkdir(parents=True, exist_ok=True)
    pid_file = settings.paths.state_dir / "demo.pid"
    pid_file.write_text(str(os.getpid()))
    redis_proc = None
    if settings.redis.url is None:
        if registered_server(settings.paths.redis_dir):
            raise SystemExit("an embedded Redis from an earlier demo is still running: `make stop` first")
        redis_proc = EmbeddedRedis(settings.paths.redis_dir, appendonly=settings.redis.appendonly, appendfsync=settings.redis.appendfsync).start()
        redis_proc.register()
        log.info("redis-server at %s (data in %s)", redis_proc.url, settings.paths.redis_dir)
        # Its data may come from an older EchoTune: move those keys to today's names.
        from app.keys import Keys
        from app.redis_server import connect, migrate_legacy_keys

        migrate_legacy_keys(connect(settings), Keys(settings.redis.key_prefix), settings.gateway.dedup_window_s)
    try:
        start_ray(settings)
        world = ensure_world(settings)
        doc = __import__("yaml").safe_load(Path(config).read_text())
        api = f"http://{doc['http_options']['host']}:{doc['http_options']['port']}"
        _run(_bin("serve"), "deploy", config, "--address", DASHBOARD)
        wait_http(f"{api}/healthz")
        # The demo's own client key (ingest + read); operators make theirs with `echotune keys create`.
        from app.events.auth import ApiKeyStore
        from app.keys import Keys
        from app.redis_server import connect

        api_key = ApiKeyStore(connect(settings), Keys(settings.redis.key_prefix)).create({"ingest", "read"}, name="demo").token
        n = post_world_events(api, world, settings.gateway.max_batch, api_key)
        log.info("posted %d events to %s/v1/events", n, api)

        jobs = JobSubmissionClient(DASHBOARD)
        submit_and_wait(jobs, ["export_events"], config)
        submit_and_wait(jobs, ["embed_content", "train_cf", "trending"], config)
        submit_and_wait(jobs, ["materialize"], config)
        # The consumer group keeps each user's fresh plays online, so new listening changes the
        # next recommendations without retraining. It runs until the demo stops.
        jobs.submit_job(
            entrypoint=f"{sys.executable} -m jobs.consume_events --config {config} --follow",
            runtime_env={"working_dir": str(ROOT)},
            submission_id=f"consume_events-{int(time.time())}",
        )

        user = _focused_user(world)
        time.sleep(settings.serving.reload_interval_s + 1)  # replicas pick up the new versions
        sample = httpx.get(f"{api}/v1/users/{user}/recommendations", params={"k": 5}, timeout=30, headers={"Authorization": f"Bearer {api_key}"}).json()
        print(
            f"\nEchoTune ready in {time.perf_counter() - t0:.0f}s\n"
            f"  API:        {api}\n"
            f"  API docs:   {api}/docs\n"
            f"  Dashboard:  {DASHBOARD}\n"
            f"  Metrics:    http://127.0.0.1:{METRICS_PORT}/metrics (Prometheus; EchoTune's are ray_echotune_*),"
            f" Prometheus targets in {ray_temp_dir(settings)}/prom_metrics_service_discovery.json, README § Operations\n"
            f"  Try:        curl -H 'Authorization: Bearer {api_key}' '{api}/v1/users/{user}/recommendations?k=10'\n"
            f"  Sample:     {json.dumps([(i['track_id'], i['genre'], i['sources']) for i in sample['items']])}\n"
            "Ctrl-C (or `make stop` from another shell) stops Serve, Ray and Redis.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C or SIGTERM (make forwards one, impatient hands press twice) must not
        # abort the shutdown half way and leave Ray and Redis running.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        log.info("stopping (further Ctrl-C ignored; `make stop` or kill -9 to force)")
        stop_ray(settings)
        if redis_proc is not None:
            redis_proc.stop()
        pid_file.unlink(missing_ok=True)


def _focused_user(world: Path) -> str:
    import pandas as pd

    users = pd.read_parquet(world / "users.parquet")
    if "taste" in users:
        users = users.assign(focus=users["taste"].map(max)).sort_values("focus", ascending=False)
    return str(users["user_id"].iloc[0])


def main() -> None:
    parser = argparse.ArgumentParser(description="Run or stop the EchoTune demo.")
    parser.add_argument("action", nargs="?", default="start", choices=["start", "stop"])
    parser.add_argument("--config", default="ray_config.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.action == "stop":
        stop_demo(load_settings(args.config))
    else:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops as cleanly as Ctrl-C
        demo(args.config)


if __name__ == "__main__":
    main()
