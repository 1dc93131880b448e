"""Fault drills: break the real thing on purpose and measure what users would see.

    .venv/bin/python scripts/fault_drills.py [--keep]      # about 3-5 minutes on 2 cores

Starts its own redis-server (append-only, in a temp folder), its own local Ray cluster
(`ray.init(address="local")`, its own temp dir) and the EchoTune Serve app on a free port,
builds a small world and runs the pipeline once (benchmarks/serve.py's `prepare`), then:

1. replica kill: `ray.kill` the Blender replica while an open-loop load of 20 req/s runs in a
   separate process; failed requests (non-200) and degraded answers, counted apart, and the
   recovery time (replica back RUNNING, and every answer clean again).
2. Redis restart under ingest: events with unique ids POSTed at a steady rate by a client
   that retries on 503 after Retry-After, while redis-server is stopped (SIGTERM) and
   restarted, then crashed (SIGKILL) and restarted, same port and data dir; then every
   acknowledged event_id is looked up in the stream.
3. worker kill: `jobs.pipeline` with every stage forced; the Ray worker process running the CF
   job (its pid reported from inside the task) gets SIGKILL mid-run; the task's max_retries
   must bring the run to `ok`.
4. Redis full: maxmemory a little above what is in use, noeviction; POST until the API
   refuses; the status codes and message, acknowledged events all in the stream, the refused
   batch not in it (all or nothing); then the limit raised and the refused batch resent.

Each drill prints its figures; the last stdout line is one JSON object. Nothing outside the
temp folders is touched: the script stops only the processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployments.runtime import apply_cluster_env, serve_logging_config, wait_http  # noqa: E402
from benchmarks.serve import prepare, settings_args  # noqa: E402

WORLD = {"n_users": 80, "n_tracks": 200, "n_artists": 20, "clip_seconds": 1.0, "days": 7, "sessions_per_user": 4.0}
LOAD_RPS = 20.0


# ------------------------------------------------------------------ clients (own processes)
async def _recommendation_load(url: str, users: list[str], rate: float, seconds: float) -> list[tuple]:
    """Open loop; one (scheduled wall time, done wall time, status, degraded) per request."""
    import httpx

    out: list[tuple] = []
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=256)) as client:
        start = time.time() + 0.2

        async def one(i: int) -> None:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.time()))
            try:
                resp = await client.get(url.format(user=users[i % len(users)]))
                degraded = resp.status_code == 200 and bool(resp.json().get("degraded"))
                out.append((scheduled, time.time(), resp.status_code, degraded))
            except Exception as exc:  # noqa: BLE001 - a transport error is a failed request
                out.append((scheduled, time.time(), type(exc).__name__, False))

        await asyncio.gather(*(one(i) for i in range(int(rate * seconds))))
    return out


def _new_events(template: list[dict], n: int) -> list[dict]:
    now = datetime.now(timezone.utc).isoformat()
    return [{**template[j % len(template)], "event_id": str(uuid.uuid4()), "timestamp": now} for j in range(n)]


async def _ingest_load(url: str, template: list[dict], rate: float, seconds: float, per_post: int) -> dict:
    """Open loop of POSTs, each a batch of fresh event ids, retried as a real client would:
    after Retry-After on 503, after a second on a transport error (the same ids each time)."""
    import httpx

    acked: list[str] = []
    stats = {"posts": 0, "answers": {}, "retries": 0, "gave_up": 0, "dropped_by_server": 0}
    async with httpx.AsyncClient(timeout=10) as client:
        start = time.time() + 0.2

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + i / rate - time.time()))
            events = _new_events(template, per_post)
            deadline = time.time() + 60
            stats["posts"] += 1
            while True:
                try:
                    resp = await client.post(url, json={"events": events})
                    code = resp.status_code
                except httpx.TransportError as exc:
                    resp, code = None, type(exc).__name__
                stats["answers"][str(code)] = stats["answers"].get(str(code), 0) + 1
                if code == 200:
                    ok = [r["event_id"] for r in resp.json()["results"] if r["status"] in ("accepted", "duplicate")]
                    stats["dropped_by_server"] += len(events) - len(ok)
                    acked.extend(ok)
                    return
                if time.time() > deadline:
                    stats["gave_up"] += 1
                    return
                stats["retries"] += 1
                await asyncio.sleep(float(resp.headers.get("retry-after", 1)) if code == 503 else 1.0)

        await asyncio.gather(*(one(i) for i in range(int(rate * seconds))))
    return {"acked": acked, **stats}


def _client_process(kind: str, args: tuple, out) -> None:
    coro = _recommendation_load(*args) if kind == "recommend" else _ingest_load(*args)
    out.put(asyncio.run(coro))


def start_client(kind: str, *args):
    """A client in its own process, so the drills' own work cannot slow its clock down."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(kind, args, queue))
    proc.start()
    return proc, queue


# ------------------------------------------------------------------------------ helpers
def stream_event_ids(client, key: str) -> list[str]:
    ids = []
    for _, fields in client.xrange(key):
        ids.append(json.loads(fields[b"e"])["event_id"])
    return ids


def replica_actors(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


class AttemptRecorder:
    """Wraps a pipeline job: each attempt writes the pid of the Ray worker running it, so the
    drill knows which process to kill and how often the job ran."""

    def __init__(self, job, path: Path):
        self.job, self.path = job, path

    def __call__(self, settings):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.job(settings)


# ------------------------------------------------------------------------------- drills
def drill_replica_kill(app: str, api: str, users: list[str], seconds: float = 30.0, kill_at: float = 8.0) -> dict:
    import ray

    deployment = "Blender"
    proc, queue = start_client("recommend", f"{api}/v1/users/{{user}}/recommendations?k=20", users, LOAD_RPS, seconds)
    time.sleep(kill_at)
    victim = replica_actors(app, deployment)[0]
    namespace = next(a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == victim)
    killed_at = time.time()
    ray.kill(ray.get_actor(victim, namespace=namespace), no_restart=True)
    print(f"[replica] killed {victim} at t+{kill_at:.0f}s of a {LOAD_RPS:.0f} req/s load", flush=True)
    replica_back_s = None
    while replica_back_s is None and time.time() - killed_at < 60:
        names = replica_actors(app, deployment)
        if victim not in names and names and running_replicas(app, deployment) >= 1:
            replica_back_s = time.time() - killed_at
        time.sleep(0.1)
    records = queue.get()
    proc.join()
    failed = [r for r in records if r[2] != 200]
    degraded = [r for r in records if r[2] == 200 and r[3]]
    after = [r for r in records if r[1] >= killed_at]
    unclean = [r for r in after if r[2] != 200 or r[3]]
    # Answers are clean again once the last failed or degraded one is out.
    clean_again_s = max((r[1] for r in unclean), default=killed_at) - killed_at
    slowest_s = max((r[1] - r[0] for r in after), default=0.0)
    result = {
        "requests": len(records),
        "failed": len(failed),
        "failed_pct": 100 * len(failed) / len(records),
        "degraded": len(degraded),
        "degraded_pct": 100 * len(degraded) / len(records),
        "failure_kinds": sorted({str(r[2]) for r in failed}),
        "replica_back_s": replica_back_s,
        "clean_again_s": clean_again_s,
        "slowest_after_kill_s": slowest_s,
        "recovery_s": max(replica_back_s if replica_back_s is not None else float("inf"), clean_again_s),
    }
    print(f"[replica] {result['requests']} requests: {result['failed']} failed ({result['failed_pct']:.2f}%, "
          f"{result['failure_kinds']}), {result['degraded']} degraded ({result['degraded_pct']:.2f}%)", flush=True)
    print(f"[replica] new replica RUNNING after {replica_back_s}s; answers clean again {clean_again_s:.2f}s after "
          f"the kill; slowest request after the kill {slowest_s:.2f}s", flush=True)
    return result


def _crash(server) -> None:
    """SIGKILL: no AOF flush on the way out, the harsh case."""
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    server.process = None


def drill_redis_restart(api: str, server, client, stream_key: str, template: list[dict]) -> dict:
    seconds, rate, per_post = 24.0, 10.0, 10
    proc, queue = start_client("ingest", f"{api}/v1/events", template, rate, seconds, per_post)
    for how, stop in (("SIGTERM", server.stop), ("SIGKILL", lambda: _crash(server))):
        time.sleep(6)
        t0 = time.time()
        stop()
        print(f"[redis-restart] redis-server stopped ({how})", flush=True)
        time.sleep(3)
        server.start()
        print(f"[redis-restart] redis-server back on the same port after {time.time() - t0:.1f}s", flush=True)
    result = queue.get()
    proc.join()
    in_stream = stream_event_ids(client, stream_key)
    acked = set(result["acked"])
    lost = acked - set(in_stream)
    ours = [i for i in in_stream if i in acked]
    figures = {
        "posts": result["posts"],
        "acked": len(acked),
        "lost": len(lost),
        "stored_twice": len(ours) - len(set(ours)),
        "answers": result["answers"],
        "client_retries": result["retries"],
        "gave_up": result["gave_up"],
        "not_acked_in_200": result["dropped_by_server"],
    }
    print(f"[redis-restart] {figures['posts']} POSTs of {per_post} events, answers {figures['answers']}, "
          f"{figures['client_retries']} client retries, {figures['gave_up']} gave up", flush=True)
    print(f"[redis-restart] acknowledged {figures['acked']}, lost {figures['lost']}, stored twice "
          f"{figures['stored_twice']}", flush=True)
    return figures


def drill_worker_kill(settings, marker: Path, victim: str = "cf") -> dict:
    from jobs.pipeline import BATCH_JOBS, Pipeline, default_jobs

    jobs = default_jobs()
    marker.mkdir(parents=True, exist_ok=True)
    wrapped = {name: AttemptRecorder(jobs[name], marker / name) for name in BATCH_JOBS}
    pipeline = Pipeline(settings, jobs=wrapped, force=True)
    report: dict = {}
    runner = threading.Thread(target=lambda: report.update(pipeline.run()))
    runner.start()
    pid_file, killed = marker / victim, None
    deadline = time.time() + 300
    while killed is None and runner.is_alive() and time.time() < deadline:
        if pid_file.exists() and pid_file.read_text().strip():
            pid = int(pid_file.read_text().split()[0])
            time.sleep(1.0)  # mid-run: the job has started its Ray Data work
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            os.kill(pid, signal.SIGKILL)
            killed = (pid, cmdline)
            print(f"[worker-kill] SIGKILL to pid {pid} ({cmdline[:60]}) running the {victim} job", flush=True)
        time.sleep(0.05)
    runner.join()
    attempts = len(pid_file.read_text().split()) if pid_file.exists() else 0
    stages = {s["stage"]: s for s in report.get("stages", [])}
    figures = {
        "killed_pid": killed[0] if killed else None,
        "attempts": attempts,
        "retries": max(0, attempts - 1),
        "stage_outcome": stages.get(victim, {}).get("outcome"),
        "run_outcome": report.get("outcome"),
        "completed": bool(killed) and report.get("outcome") == "ok",
        "stages": {k: v["outcome"] for k, v in stages.items()},
    }
    print(f"[worker-kill] {victim} ran {attempts} time(s) ({figures['retries']} retry); stages {figures['stages']}; "
          f"run {figures['run_outcome']}", flush=True)
    return figures


def drill_redis_full(api: str, client, stream_key: str, template: list[dict], per_post: int = 50) -> dict:
    import httpx

    used = int(client.info("memory")["used_memory"])
    limit = used + 2 * 1024 * 1024
    old_policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", limit)
    print(f"[redis-full] maxmemory {limit} bytes (in use {used}), noeviction", flush=True)
    acked: list[str] = []
    refusals: list[tuple[int, str, str | None, list[dict]]] = []
    try:
        for _ in range(2000):
            events = _new_events(template, per_post)
            resp = httpx.post(f"{api}/v1/events", json={"events": events}, timeout=30)
            if resp.status_code == 200:
                acked += [r["event_id"] for r in resp.json()["results"] if r["status"] in ("accepted", "duplicate")]
                continue
            refusals.append((resp.status_code, resp.text, resp.headers.get("retry-after"), events))
            if len(refusals) >= 3:  # the same answer every time, not a blip
                break
        stored = set(stream_event_ids(client, stream_key))
        refused_ids = {e["event_id"] for r in refusals for e in r[3]}
        figures = {
            "acked": len(acked),
            "status_codes": sorted({r[0] for r in refusals}),
            "message": refusals[0][1] if refusals else None,
            "retry_after": refusals[0][2] if refusals else None,
            "lost": len(set(acked) - stored),
            "refused_but_stored": len(refused_ids & stored),
        }
        figures["clear_error"] = bool(refusals) and all(
            r[0] in (503, 507) and "full" in r[1] and r[2] is not None for r in refusals)
        print(f"[redis-full] {figures['acked']} events acknowledged before the limit; then "
              f"{[r[0] for r in refusals]} {figures['message']} (Retry-After {figures['retry_after']})", flush=True)
        print(f"[redis-full] acknowledged but missing: {figures['lost']}; refused but stored: "
              f"{figures['refused_but_stored']}", flush=True)
    finally:
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", old_policy)
    # The limit is raised: a client resending what was refused gets it stored.
    recovered = bool(refusals)
    for _, _, _, events in refusals:
        resp = httpx.post(f"{api}/v1/events", json={"events": events}, timeout=30)
        recovered &= resp.status_code == 200 and all(r["status"] == "accepted" for r in resp.json()["results"])
    stored = set(stream_event_ids(client, stream_key))
    figures["recovered"] = recovered and refused_ids <= stored
    print(f"[redis-full] limit raised: resent batches accepted and in the stream: {figures['recovered']}", flush=True)
    return figures


# --------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="Keep the temp folder (world, artifacts, logs).")
    opts = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    apply_cluster_env(os.environ, own_side_ports=True)  # as deployed; before Ray Serve is imported

    import pandas as pd
    import ray
    import redis
    from ray import serve

    from app.config import settings_from_args
    from app.redis_server import EmbeddedRedis, free_port
    from deployments.app import build_app
    work = Path(tempfile.mkdtemp(prefix="etfd", dir="/tmp"))  # short: Ray's socket paths
    server = EmbeddedRedis(work / "redis", appendonly=True).start()
    results: dict = {}
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(work / "ray"))
        port = free_port()
        logging_config = serve_logging_config()  # ray_config.yaml's, as `serve deploy` applies it
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
        api = f"http://127.0.0.1:{port}"
        args = settings_args(work / "state", server.url, WORLD)
        args["content"] = {"concurrency": 2, "batch_size": 20, "embedding_dim": 8, "analysis_seconds": 1.0}
        args["cf"] = {"factors": 8, "iterations": 4, "ray_workers": 2, "eval_fraction": 0.0}
        settings = settings_from_args(args)
        t0 = time.time()
        serve.run(build_app(args), name="echotune", route_prefix="/", logging_config=logging_config)
        wait_http(f"{api}/healthz")
        prepare(args, api)
        print(f"[setup] world, pipeline and Serve app ready in {time.time() - t0:.0f}s at {api}", flush=True)
        users = pd.read_parquet(settings.paths.world_dir / "users.parquet")["user_id"].tolist()
        template = [{"user_id": u, "track_id": t, "event_type": "play"} for u, t in zip(
            users, pd.read_parquet(settings.paths.world_dir / "tracks.parquet")["track_id"].tolist())]
        client = redis.Redis.from_url(server.url)
        stream_key = settings.redis.stream_key

        start_client("recommend", f"{api}/v1/users/{{user}}/recommendations?k=20", users, LOAD_RPS, 3.0)[1].get()  # warm-up
        results["replica"] = drill_replica_kill("echotune", api, users)
        results["restart"] = drill_redis_restart(api, server, client, stream_key, template)
        results["worker"] = drill_worker_kill(settings, work / "attempts")
        results["full"] = drill_redis_full(api, client, stream_key, template)
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            server.stop()
            if not opts.keep:
                shutil.rmtree(work, ignore_errors=True)
    rep, rst, wk, full = results["replica"], results["restart"], results["worker"], results["full"]
    print(json.dumps({
        "replica_kill_failed_pct": round(rep["failed_pct"], 3),
        "replica_kill_recovery_s": round(rep["recovery_s"], 2),
        "redis_restart_acked": rst["acked"],
        "redis_restart_lost": rst["lost"],
        "worker_kill_job_completed": wk["completed"],
        "worker_kill_retries": wk["retries"],
        "redis_full_status_codes": full["status_codes"],
        "redis_full_lost": full["lost"],
        "redis_full_recovered": full["recovered"],
        "replica_kill_degraded_pct": round(rep["degraded_pct"], 3),
        "replica_kill_replica_back_s": None if rep["replica_back_s"] is None else round(rep["replica_back_s"], 2),
        "redis_restart_stored_twice": rst["stored_twice"],
        "redis_full_clear_error": full["clear_error"],
    }))


if __name__ == "__main__":
    main()
