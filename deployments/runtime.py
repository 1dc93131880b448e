"""The environment an EchoTune Ray cluster starts with (CLUSTER_ENV), the one its app's
replicas run with (REPLICA_ENV), and waiting for a route to answer."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from pathlib import Path

import httpx
import yaml

from app.config import PROJECT_ROOT
from app.redis_server import free_port

# Serve reads these when it is imported, in the controller and proxy as much as in replicas,
# so they belong to the cluster's environment (`ray start`, `ray.init`, a pod's env), not to
# an application's runtime_env. Each is a default: a value already set wins.
#
# - RAY_SERVE_THROUGHPUT_OPTIMIZED: Ray's high-throughput mode (Ray >= 2.56): calls between
#   deployments go over gRPC instead of actor tasks, user code and the router run on the
#   replica's own event loop (no thread hop per call), request-path logs are buffered.
# - RAY_SERVE_ENABLE_HA_PROXY: HAProxy (bundled with ray[serve] on Linux) listens on the HTTP
#   port and forwards straight to the ingress replicas (direct ingress), instead of the Python
#   proxy actor, which relayed every request and polled for each body.
#   The bare 6-hop chain of benchmarks/serve.py deployed alone on 2 cores, same load script,
#   minutes apart: p95 at 50 req/s 45 -> 17 ms, saturation 86 -> 129 req/s against Serve's
#   defaults (README § Serving has the full benchmark's figures).
# - RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1: undoes one part of that mode, for drivers: with the
#   router on the caller's loop, a DeploymentHandle cannot be called from synchronous code
#   (a script, a job, a test). The app's replicas put it back (REPLICA_ENV).
# - MALLOC_ARENA_MAX=2: glibc's per-thread arenas (8 per core by default) never shrink; the
#   ingress grew ~1 MB/min in the soak without the cap and stayed flat with it.
# - RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5 (Serve's default 0.1) and
#   RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=1000 (100): the controller's loop and every replica's
#   and router's metrics flush, run whether or not requests come. With the app and the bare
#   chain of benchmarks/serve.py deployed on 2 cores and idle, the controller took 27 against
#   90 ms of CPU per second and each replica 9-10 against 12-13: 0.11 of a core back, about
#   5% of the machine. The price: the controller acts up to 0.4 s later (autoscaling counts
#   its delays in loop steps of this interval, so upscale_delay_s keeps its meaning), and
#   metrics reach Prometheus up to a second later, against a scrape interval of 10 s or more.
#   `serve.run` of the app to ready took 19.7 against 22.7-23.0 s, twice each.
CLUSTER_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "MALLOC_ARENA_MAX": "2",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


# The app's replicas call handles only from async code, so they take the high-throughput mode's
# own default back through the app's runtime_env (ray_config.yaml, deploy/rayservice.yaml, and
# ApiIngress's options for apps started with `serve.run`): each handle call is then scheduled on
# the replica's loop instead of hopping to a router thread and back. Two copies of the app on
# one 2-core cluster, the same load alternating between them three times (50 req/s, then 32
# closed-loop clients): the ingress spent 5.95-6.62 against 6.90-8.10 ms of CPU per request at
# 50 req/s and 2.20-2.41 against 2.63-2.76 at saturation, which was 167-184 against 159-170 req/s.
REPLICA_ENV = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def apply_cluster_env(environ: MutableMapping[str, str], own_side_ports: bool = False) -> None:
    """Set CLUSTER_ENV's defaults in `environ` before this process imports Ray Serve (every
    process of a local cluster inherits it, and handles built here take their transport from
    it). `own_side_ports` moves HAProxy's metrics and stats ports off their defaults (9101,
    8404) to free ones, for a second cluster on the same machine such as the tests'."""
    for key, value in CLUSTER_ENV.items():
        environ.setdefault(key, value)
    if own_side_ports:
        for key in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"):
            if key not in environ:
                environ[key] = str(free_port())


def serve_logging_config(config_path: Path = PROJECT_ROOT / "ray_config.yaml") -> dict:
    """The config file's Serve `logging_config`, for apps started with `serve.run` (scripts,
    benchmarks): `serve deploy` applies it to every app, `serve.run` to none. An ingress left at
    Serve's default level built an access-log record per request (2% of its CPU under py-spy)."""
    return yaml.safe_load(Path(config_path).read_text())["logging_config"]


def wait_http(url: str, timeout_s: float = 300) -> None:
    """Until `url` answers 200: `serve.run` returns when the replicas are up, and HAProxy
    takes a moment more to load the new routes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s}s")
