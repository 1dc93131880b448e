"""Ingestion throughput and acknowledgement latency of POST /v1/events, against a bare peer.

    .venv/bin/python benchmarks/ingest.py [--seconds 8] [--concurrency 8] [--rate 50]

Starts its own append-only redis-server, a local Ray cluster and Serve on free ports (never
the demo's), then measures, at batch 100:
- the full path (ApiIngress with API-key auth + Redis token bucket -> EventGateway: validate,
  enrich, dedup + sessionise + XADD in one Lua call) with 1 and with 2 replicas of each;
- the peer, in the same run: one bare Serve FastAPI deployment that only XADDs each event.
Throughput is closed-loop (`--concurrency` clients posting back to back); latency is open-loop
at `--rate` requests/s (default: half the variant's measured capacity), measured from each
request's scheduled send time so queueing counts.
Lost = events acknowledged as accepted but absent from the stream (must be 0).
The last line is one JSON object: events_per_s, p99_ms, lost, ratio_vs_bare (+ details).
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 100


def make_batch(n: int = BATCH) -> dict:
    ts = int(datetime.now(timezone.utc).timestamp() * 1000) - 1000
    return {"events": [{"event_id": str(uuid.uuid4()), "user_id": f"u{i % 500}", "track_id": f"t{i % 2000}", "event_type": "play", "timestamp": ts} for i in range(n)]}


async def closed_loop(url: str, headers: dict, seconds: float, concurrency: int) -> tuple[int, list[str], int]:
    """Clients post back to back; returns (accepted events, their ids, errors)."""
    accepted_ids: list[str] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            try:
                resp = await http.post(url, json=make_batch(), headers=headers)
            except httpx.HTTPError:
                errors += 1
                continue
            if resp.status_code != 200:
                errors += 1
                continue
            accepted_ids.extend(r["event_id"] for r in resp.json().get("results", []) if r["status"] == "accepted")

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return int(len(accepted_ids) / elapsed), accepted_ids, errors


async def open_loop(url: str, headers: dict, seconds: float, rate: float) -> tuple[list[float], list[str], int]:
    """Requests at a fixed rate; latency from the scheduled send time, in ms."""
    latencies: list[float] = []
    ids: list[str] = []
    errors = 0
    bodies = [make_batch() for _ in range(int(seconds * rate))]

    async def one(http: httpx.AsyncClient, when: float, body: dict) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        try:
            resp = await http.post(url, json=body, headers=headers)
        except httpx.HTTPError:
            resp = None
        latencies.append((time.perf_counter() - when) * 1000)
        if resp is None or resp.status_code != 200:
            errors += 1
        else:
            ids.extend(r["event_id"] for r in resp.json().get("results", []) if r["status"] == "accepted")

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=256)) as http:
        t0 = time.perf_counter() + 0.2
        await asyncio.gather(*(one(http, t0 + i / rate, b) for i, b in enumerate(bodies)))
    return latencies, ids, errors


def percentiles(lat: list[float]) -> dict:
    a = np.asarray(lat)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--rate", type=float, default=0.0, help="open-loop requests/s for latency; 0: half of the variant's measured capacity")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import redis
    from fastapi import FastAPI, Request
    from ray import serve

    from app.config import settings_from_args
    from app.events.auth import ApiKeyStore
    from app.keys import Keys
    from app.redis_server import EmbeddedRedis, free_port
    from deployments.gateway import EventGateway
    from deployments.ingress import ApiIngress

    tmp = Path(tempfile.mkdtemp(prefix="echotune-bench-"))
    server = EmbeddedRedis(tmp / "redis", appendonly=True).start()
    client = redis.Redis.from_url(server.url)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp / "ray"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING", "enable_access_log": False})
    base = f"http://127.0.0.1:{port}"

    bare_api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    @serve.ingress(bare_api)
    class BareXadd:
        """The peer: the same HTTP front, then only XADD per event (no auth, checks or dedup)."""

        def __init__(self, url: str):
            import redis as r

            self.client = r.Redis.from_url(url)

        @bare_api.post("/v1/events")
        async def post(self, request: Request):
            body = await request.json()
            pipe = self.client.pipeline(transaction=False)
            for e in body["events"]:
                pipe.xadd("bare:events", {"e": json.dumps(e)})
            ids = pipe.execute()
            return {"results": [{"event_id": e["event_id"], "status": "accepted"} for e, _ in zip(body["events"], ids)]}

    fast = {"rate_per_s": 1e6, "burst": 1_000_000}
    results: dict[str, dict] = {}
    lost_total = 0
    try:
        serve.run(BareXadd.bind(server.url), name="bare", route_prefix="/bare")
        eps, ids, errs = asyncio.run(closed_loop(f"{base}/bare/v1/events", {}, args.seconds, args.concurrency))
        rate = args.rate or max(1.0, eps / BATCH / 2)
        lat, lids, lerrs = asyncio.run(open_loop(f"{base}/bare/v1/events", {}, args.seconds, rate))
        lost = len(ids) + len(lids) - client.xlen("bare:events")
        results["bare"] = {"events_per_s": eps, **percentiles(lat), "latency_at_req_per_s": round(rate, 1), "errors": errs + lerrs, "lost": max(0, lost)}
        print(f"bare XADD      : {eps:>7} events/s  latency@{rate:.0f}req/s {percentiles(lat)}  errors {errs + lerrs}", flush=True)
        serve.delete("bare")

        for replicas in (1, 2):
            prefix = f"bench{replicas}"
            settings = settings_from_args({
                "redis": {"url": server.url, "key_prefix": prefix, "stream_key": f"{prefix}:events"},
                "paths": {"state_dir": str(tmp / "state")},
                "rate_limit": {"ingest": fast, "read": fast, "admin": fast},
            })
            app = ApiIngress.options(num_replicas=replicas).bind(settings, EventGateway.options(num_replicas=replicas).bind(settings), None, None, None)
            serve.run(app, name=prefix, route_prefix=f"/{prefix}")
            headers = {"Authorization": f"Bearer {ApiKeyStore(client, Keys(prefix)).create({'ingest'}).token}"}
            url = f"{base}/{prefix}/v1/events"
            _, warm_ids, _ = asyncio.run(closed_loop(url, headers, 1.0, 2))  # warm-up (connections, first Lua load)
            eps, ids, errs = asyncio.run(closed_loop(url, headers, args.seconds, args.concurrency))
            ids = warm_ids + ids  # every acknowledged event counts for `lost`
            rate = args.rate or max(1.0, eps / BATCH / 2)
            lat, lids, lerrs = asyncio.run(open_loop(url, headers, args.seconds, rate))
            stored = {json.loads(f[b"e"])["event_id"] for _, f in client.xrange(settings.redis.stream_key)}
            lost = len((set(ids) | set(lids)) - stored)
            lost_total += lost
            results[f"gateway_x{replicas}"] = {"events_per_s": eps, **percentiles(lat), "latency_at_req_per_s": round(rate, 1), "errors": errs + lerrs, "lost": lost, "acknowledged": len(ids) + len(lids), "in_stream": len(stored)}
            print(f"gateway x{replicas}     : {eps:>7} events/s  latency@{rate:.0f}req/s {percentiles(lat)}  errors {errs + lerrs}  lost {lost}", flush=True)
            serve.delete(prefix)
    finally:
        serve.shutdown()
        ray.shutdown()
        server.stop()

    best = max(("gateway_x1", "gateway_x2"), key=lambda k: results[k]["events_per_s"])
    ratio = results[best]["events_per_s"] / max(1, results["bare"]["events_per_s"])
    print(f"best: {best}, ratio vs bare XADD {ratio:.2f}; target >= 10000 events/s and p99 <= 25 ms")
    print(json.dumps({
        "events_per_s": results[best]["events_per_s"],
        "p99_ms": results[best]["p99_ms"],
        "lost": lost_total,
        "ratio_vs_bare": round(ratio, 3),
        "best": best,
        "batch": BATCH,
        "variants": results,
    }))


if __name__ == "__main__":
    main()
