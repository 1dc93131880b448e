"""Load soak: recommendations at a fixed rate plus event ingest, for minutes, watching memory.

    .venv/bin/python scripts/soak.py                      # 10 minutes, 50 req/s + 1,000 events/s
    .venv/bin/python scripts/soak.py --minutes 2          # a quick look

The whole system runs as in production, on one local Ray cluster: the Serve application
(ingress → fetch → CF and content retrieval → blend → rerank; the event gateway), a
consumer group applying events online, and the export job landing the stream as Parquet
every minute (which trims the stream, so Redis holds a bounded backlog as it would in
operation). Auth is on: both load generators use a real API key.

Reported: errors and latency of both loads; resident memory (RSS) of every process of the
system (Serve replicas, proxy, controller, consumers, raylet, GCS, Redis, the driver) after a
warm-up minute and at the end, and its slope over the second half of the run; and that every
accepted event is in Parquet or still in the stream, exactly once. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from deployments.runtime import serve_logging_config, wait_http  # noqa: E402
from benchmarks.serve import load_test_env, local_system, prepare  # noqa: E402

WARMUP_S = 60.0
SAMPLE_EVERY_S = 15.0
EXPORT_EVERY_S = 60.0
REDIS_USED = "redis used_memory (data, not a process)"
MAX_RETRIES = 5
"""Resends of a batch answered 503/429 (Retry-After honoured) before it counts as an error."""


# ------------------------------------------------------------ both loads (one process, aiohttp)
async def _open_loop(rate: float, seconds: float, send) -> tuple[list[float], dict[str, int]]:
    """Fixed arrival rate: request i is due at start + i/rate and is started then, whatever
    the earlier ones are doing; its latency counts from when it was due. Requests are started
    as they fall due rather than all parked up front, which keeps the generator light."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    tasks: set[asyncio.Task] = set()
    start = time.perf_counter() + 0.2

    async def one(i: int, due: float) -> None:
        try:
            ok = await send(i)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, by kind
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        if ok is True:
            latencies.append(time.perf_counter() - due)
        else:
            errors[str(ok)] = errors.get(str(ok), 0) + 1

    for i in range(int(rate * seconds)):
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        task = asyncio.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    return latencies, errors


def _percentiles(latencies: list[float]) -> dict:
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}


async def _loads(api: str, key: str, users: list[str], tracks: list[str], rps: float, events_per_s: float, batch: int, seconds: float) -> tuple[dict, dict]:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"}
    rng = np.random.default_rng(7)
    counts = {"accepted": 0, "duplicates": 0}
    retried: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=256)) as http:

        async def recommend(i: int):
            async with http.get(f"{api}/v1/users/{users[i % len(users)]}/recommendations", params={"k": "20"}) as resp:
                await resp.read()
                return True if resp.status == 200 else resp.status

        async def ingest(i: int):
            now_ms = int(time.time() * 1000)
            body = {"events": [
                {"event_id": str(uuid.uuid4()), "user_id": users[int(u)], "track_id": tracks[int(t)],
                 "event_type": "play", "timestamp": now_ms, "duration_ms": 30_000}
                for u, t in zip(rng.integers(len(users), size=batch), rng.integers(len(tracks), size=batch))
            ]}
            for attempt in range(MAX_RETRIES + 1):
                async with http.post(f"{api}/v1/events", json=body) as resp:
                    answer = await resp.json(content_type=None)
                    if resp.status not in (429, 503) or attempt == MAX_RETRIES:
                        break
                    # What the web client's outbox does: nothing was stored, wait as told, resend.
                    retried[str(resp.status)] = retried.get(str(resp.status), 0) + 1
                    wait = float(resp.headers.get("Retry-After", "1"))
                await asyncio.sleep(wait)
            if resp.status != 200:
                return resp.status
            counts["accepted"] += answer["accepted"]
            counts["duplicates"] += answer["duplicates"]
            return True

        (rec_lat, rec_err), (ing_lat, ing_err) = await asyncio.gather(
            _open_loop(rps, seconds, recommend), _open_loop(events_per_s / batch, seconds, ingest)
        )
    rec = {"sent": int(rps * seconds), "ok": len(rec_lat), "errors": sum(rec_err.values()), "error_kinds": rec_err, **_percentiles(rec_lat)}
    ing = {"requests": int(events_per_s / batch * seconds), "ok": len(ing_lat), "errors": sum(ing_err.values()), "error_kinds": ing_err,
           "retried": retried, **counts, **_percentiles(ing_lat)}
    return rec, ing


def _load_process(args: tuple, out) -> None:
    out.put(asyncio.run(_loads(*args)))


# ------------------------------------------------------------------------ memory sampling
def system_processes(redis_pid: int) -> dict[int, str]:
    """pid -> a stable name for every process of the system under test: this driver, the Ray
    processes it started (GCS, raylet, workers, all its descendants) and Redis. Other Ray
    clusters on the machine are not ours and are left out."""
    import psutil

    found = {os.getpid(): "driver", redis_pid: "redis-server"}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::"):
            name = cmd.split()[0].removeprefix("ray::").split(".")[0]
        else:
            name = Path(cmd.split()[0]).name if cmd else proc.name()
        if name not in ("IDLE", "python", "python3") and not name.startswith("ray::IDLE"):
            found[proc.pid] = f"{name}[{proc.pid}]"
    return found


def rss_mb(pids: dict[int, str]) -> dict[str, float]:
    import psutil

    out = {}
    for pid, name in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            out[name] = float("nan")
    return out


def memory_report(samples: list[tuple[float, dict[str, float]]], end_s: float) -> dict:
    """Per process: RSS after the warm-up, at the end, growth, and the slope (MB/min) of a
    least-squares line over the second half of the run."""
    warmup = min(WARMUP_S, end_s / 4)  # short runs (a quick look) still get a baseline
    base_t, base = next((t, s) for t, s in samples if t >= warmup)
    _, last = samples[-1]
    half = [(t, s) for t, s in samples if t >= end_s / 2]
    report = {}
    for name in base:
        ts = np.asarray([t for t, s in half if np.isfinite(s.get(name, np.nan))])
        ys = np.asarray([s[name] for t, s in half if np.isfinite(s.get(name, np.nan))])
        slope = float(np.polyfit(ts / 60, ys, 1)[0]) if len(ts) >= 3 else float("nan")
        report[name] = {
            "start_mb": round(base[name], 1), "end_mb": round(last.get(name, float("nan")), 1),
            "growth_pct": round(100 * (last.get(name, np.nan) / base[name] - 1), 1), "slope_mb_per_min": round(slope, 2),
        }
    return report


# ----------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rps", type=float, default=50.0, help="Recommendation requests per second.")
    parser.add_argument("--events-per-s", type=float, default=1000.0)
    parser.add_argument("--batch", type=int, default=100, help="Events per POST.")
    parser.add_argument("--dedup-window-s", type=int, default=None,
                        help="gateway.dedup_window_s (default: the configured day). Redis holds one "
                             "marker per event accepted in the window, so its memory levels off once the "
                             "soak outlasts the window: a short one shows that inside a 10-minute run.")
    parser.add_argument("--state", type=Path, default=Path(tempfile.gettempdir()) / "echotune-soak")
    args = parser.parse_args()
    load_test_env()  # before Ray Serve is imported

    import pandas as pd
    import ray
    import redis
    from ray import serve

    from app.config import settings_from_args
    from app.events.auth import ApiKeyStore
    from app.keys import Keys
    from deployments.app import build_app
    from jobs.consume_events import ConsumerActor
    from jobs.export_events import export_events

    seconds = args.minutes * 60
    with local_system(args.state) as (redis_server, port, app_args):
        app_args["auth"] = {"enabled": True}
        if args.dedup_window_s:
            app_args.setdefault("gateway", {})["dedup_window_s"] = args.dedup_window_s
        # One key drives each load; the per-key buckets must admit the soak's own rates.
        app_args["rate_limit"] = {"read": {"rate_per_s": 4 * args.rps, "burst": 8 * int(args.rps)},
                                  "ingest": {"rate_per_s": 400.0, "burst": 800}}
        settings = settings_from_args(app_args)
        client = redis.Redis.from_url(redis_server.url)
        key = ApiKeyStore(client, Keys(settings.redis.key_prefix)).create({"ingest", "read"}).token
        serve.run(build_app(app_args), name="echotune", route_prefix="/", logging_config=serve_logging_config())
        api = f"http://127.0.0.1:{port}"
        wait_http(f"{api}/healthz")
        prepare(app_args, api, headers={"Authorization": f"Bearer {key}"})
        # The preparation's own events: the soak's count starts from what is already landed,
        # and from the last stream entry so far (export keeps entries until the consumer group
        # exists, so the preparation's may still be in the stream).
        export_events(settings)
        exported_before = _parquet_rows(settings.paths.events_dir)
        last = client.xrevrange(settings.redis.stream_key, count=1)
        last_id_before = last[0][0].decode() if last else "0-0"
        redis_before = _redis_memory(client)

        consumers = [ConsumerActor.options(max_concurrency=2).remote(settings, f"soak-{i}") for i in range(settings.consumer.consumers)]
        followers = [c.follow.remote() for c in consumers]
        # Start from a steady state: on a fresh state folder the consumers first apply the
        # preparation's events, and an open-loop load started on top of that catch-up queues
        # behind it and (at this rate, near what 2 cores serve) never drains. Found by the soak.
        caught_up = _wait_caught_up(client, settings, timeout_s=300.0)
        print(f"consumers caught up with the preparation's events in {caught_up:.0f} s", flush=True)
        users = pd.read_parquet(args.state / "world" / "users.parquet")["user_id"].tolist()
        tracks = pd.read_parquet(args.state / "world" / "tracks.parquet")["track_id"].tolist()

        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        load = ctx.Process(target=_load_process, args=((api, key, users, tracks, args.rps, args.events_per_s, args.batch, seconds), results))
        pids = system_processes(redis_server.process.pid)
        samples: list[tuple[float, dict[str, float]]] = []
        exports: list[dict] = []
        export_failures = 0
        t0 = time.perf_counter()
        load.start()
        print(f"soak: {args.minutes:g} min, {args.rps:g} req/s + {args.events_per_s:g} events/s; {len(pids)} processes watched", flush=True)
        next_export = EXPORT_EVERY_S
        while load.is_alive():
            elapsed = time.perf_counter() - t0
            samples.append((elapsed, {**rss_mb(pids), REDIS_USED: _redis_memory(client)["used_mb"]}))
            if elapsed >= next_export:
                next_export += EXPORT_EVERY_S
                try:
                    exports.append(export_events(settings))
                except redis.RedisError as exc:  # the job already retried; a scheduler would run it again
                    export_failures += 1
                    print(f"  export failed after its retries: {exc}", flush=True)
                    continue
                total = float(np.nansum([mb for name, mb in samples[-1][1].items() if name != REDIS_USED]))
                print(f"  {elapsed / 60:4.1f} min: system RSS {total:,.0f} MB, stream {exports[-1]['stream_length']:,} entries", flush=True)
            time.sleep(SAMPLE_EVERY_S if elapsed < seconds - SAMPLE_EVERY_S else 1.0)
        rec_result, ing_result = results.get()
        load.join()
        samples.append((time.perf_counter() - t0, {**rss_mb(pids), REDIS_USED: _redis_memory(client)["used_mb"]}))
        ray.get([c.stop.remote() for c in consumers])
        consumer_stats = ray.get(followers)
        exports.append(export_events(settings))
        exported = _parquet_rows(settings.paths.events_dir) - exported_before
        in_stream = len(client.xrange(settings.redis.stream_key, min=f"({last_id_before}", max="+"))
        redis_after = _redis_memory(client)
        dead_letters = client.xlen(settings.redis.dead_letter_key)

    memory = memory_report(samples, seconds)
    print(f"\nrecommendations: {rec_result['ok']}/{rec_result['sent']} ok, errors {rec_result['errors']} {rec_result['error_kinds']}, "
          f"p50 {rec_result['p50_ms']:.1f} ms, p95 {rec_result['p95_ms']:.1f} ms, p99 {rec_result['p99_ms']:.1f} ms")
    print(f"ingest: {ing_result['ok']}/{ing_result['requests']} requests ok, errors {ing_result['errors']} {ing_result['error_kinds']}, "
          f"accepted {ing_result['accepted']:,} events, p99 {ing_result['p99_ms']:.1f} ms, resent after 503/429: {ing_result['retried']}")
    print(f"exports: {len(exports)} ok, {export_failures} failed")
    print(f"events: accepted {ing_result['accepted']:,}; in Parquet {exported:,}; left in the stream {in_stream:,}; "
          f"dead letters {dead_letters}")
    print(f"consumers applied {sum(s['applied'] for s in consumer_stats):,} events")
    print(f"redis: {redis_before['keys']:,} keys, {redis_before['used_mb']:.1f} MB used -> {redis_after['keys']:,} keys, "
          f"{redis_after['used_mb']:.1f} MB (dedup markers live gateway.dedup_window_s = {settings.gateway.dedup_window_s:,} s; "
          "sessions and recent plays per user)\n")
    print(f"{'process':<44} {'start MB':>9} {'end MB':>9} {'growth':>8} {'MB/min (2nd half)':>18}")
    for name, m in sorted(memory.items(), key=lambda kv: -kv[1]["end_mb"]):
        print(f"{name:<44} {m['start_mb']:>9.1f} {m['end_mb']:>9.1f} {m['growth_pct']:>7.1f}% {m['slope_mb_per_min']:>18.2f}")
    processes = {name: m for name, m in memory.items() if name != REDIS_USED}
    growth = [m["growth_pct"] for m in processes.values() if np.isfinite(m["growth_pct"])]
    summary = {
        "minutes": args.minutes,
        "rps": args.rps,
        "events_per_s": args.events_per_s,
        "rec_requests": rec_result["sent"],
        "rec_errors": rec_result["errors"],
        "rec_p95_ms": round(rec_result["p95_ms"], 1),
        "ingest_requests": ing_result["requests"],
        "ingest_errors": ing_result["errors"],
        "events_accepted": ing_result["accepted"],
        "events_lost": ing_result["accepted"] - exported - in_stream,
        "ingest_resent": sum(ing_result["retried"].values()),
        "export_failures": export_failures,
        "errors": rec_result["errors"] + ing_result["errors"] + export_failures,
        "max_rss_growth_pct": max(growth),
        "system_rss_start_mb": round(sum(m["start_mb"] for m in processes.values()), 1),
        "redis_keys_start": redis_before["keys"],
        "redis_keys_end": redis_after["keys"],
        "system_rss_end_mb": round(sum(m["end_mb"] for m in processes.values() if np.isfinite(m["end_mb"])), 1),
        "dedup_window_s": settings.gateway.dedup_window_s,
        "redis_used_mb_start": round(memory[REDIS_USED]["start_mb"], 1),
        "redis_used_mb_end": round(memory[REDIS_USED]["end_mb"], 1),
        "redis_used_slope_mb_per_min": memory[REDIS_USED]["slope_mb_per_min"],
    }
    print(json.dumps(summary))


def _wait_caught_up(client, settings, timeout_s: float) -> float:
    """Seconds until the consumer group has nothing undelivered and nothing pending."""
    from deployments.metrics import stream_health

    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        group = stream_health(client, settings.redis.stream_key, settings.redis.dead_letter_key)["groups"].get(settings.consumer.group)
        if group is not None and group["lag"] == 0 and group["pending"] == 0:
            break
        time.sleep(1.0)
    return time.perf_counter() - start


def _redis_memory(client) -> dict:
    return {"keys": client.dbsize(), "used_mb": client.info("memory")["used_memory"] / 2**20}


def _parquet_rows(events_dir: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in events_dir.rglob("*.parquet")) if events_dir.exists() else 0


if __name__ == "__main__":
    main()
