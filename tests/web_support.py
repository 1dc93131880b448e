"""Shared set-up of the web and push tests: a tiny published catalogue (so the Serve app
answers real recommendations and trending) and the system Chromium via Playwright."""

from __future__ import annotations

import shutil
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

APP_NAME = "webtest"
PREFIX = "/webtest"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".webmanifest": "application/manifest+json"}

GENRES = ["rock", "jazz"]
TRACKS = pd.DataFrame(
    {
        "track_id": [f"t{i:03d}" for i in range(16)],
        "artist_id": [f"a{i // 2:02d}" for i in range(16)],
        "genre": [GENRES[i % 2] for i in range(16)],
    }
)


def publish_tiny_catalogue(settings) -> None:
    """Content + popularity artifacts and trending lists for 16 tracks: what the batch jobs
    would publish, small enough to write in milliseconds."""
    from app.artifacts import ArtifactStore
    from app.redis_server import connect
    from app.trending.lists import TrendingLists

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(TRACKS), 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    store = ArtifactStore(settings.paths.artifacts_dir)
    with store.publish("content") as folder:
        TRACKS.to_parquet(folder / "tracks.parquet")
        np.save(folder / "embeddings.npy", emb)
    with store.publish("trending") as folder:
        pd.DataFrame({"track_id": TRACKS["track_id"], "score": np.linspace(100, 10, len(TRACKS))}).to_parquet(folder / "popular.parquet")
    trend = TRACKS.head(6).assign(rank_score=np.linspace(6, 1, 6), observed=np.linspace(60, 20, 6), expected=5.0)
    lists = {"global": trend, **{f"genre:{g}": trend[trend["genre"] == g] for g in GENRES}}
    TrendingLists(connect(settings), settings.redis.key_prefix).publish("test-v1", lists, ttl_s=3600)


def launch_chromium(playwright):
    """The system Chromium (never a downloaded one); `make test` installs it when missing."""
    if not CHROMIUM.exists():
        hint = "run `make browser` (apt-get install -y chromium)" if shutil.which("apt-get") else "no apt-get here to install it"
        pytest.skip(f"{CHROMIUM} not found: {hint}")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@pytest.fixture(scope="session")
def web_redis(tmp_path_factory):
    """The web app's own redis-server: it lives for the whole session, and other tests flush
    the shared server's database between modules."""
    from app.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("web-redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def web_app(tmp_path_factory, web_redis, serve_port):
    """One Serve app for the web and push tests (imported by conftest so it starts once):
    its own redis-server, key prefix and stream, demo sign-in on, loopback push endpoints allowed."""
    from ray import serve

    from app.config import settings_from_args
    from app.push.vapid import ensure_vapid_keys, vapid_key_path
    from deployments.app import build_app

    tag = uuid.uuid4().hex[:6]
    args = {
        "redis": {"url": web_redis.url, "key_prefix": f"web{tag}", "stream_key": f"web{tag}:events", "dead_letter_key": f"web{tag}:dlq"},
        "paths": {"state_dir": str(tmp_path_factory.mktemp("web-state"))},
        "serving": {"reload_interval_s": 0.5},
        "web": {"demo_sign_in": True},
        "push": {"endpoint_hosts": ["127.0.0.1"], "vapid_subject": "mailto:test@echotune.invalid"},
    }
    settings = settings_from_args(args)
    publish_tiny_catalogue(settings)
    ensure_vapid_keys(vapid_key_path(settings))
    serve.run(build_app(args), name=APP_NAME, route_prefix=PREFIX)
    yield {"settings": settings, "args": args, "base": f"http://127.0.0.1:{serve_port}{PREFIX}"}
    serve.delete(APP_NAME)


class OldStyleShellServer:
    """web/ under /app/ on loopback, served as a server without Cache-Control does (as /app
    was before it sent `no-cache`): a Last-Modified long past, so the browser's heuristic cache
    deems every file fresh for weeks. `deploy(path, body)` changes a file as a new release
    would; `requests` records each GET's path and headers."""

    def __init__(self):
        self.files = {f"/app/{f.name}": f.read_bytes() for f in WEB_DIR.iterdir() if f.is_file()}
        self.files["/app/"] = self.files["/app/index.html"]
        self.requests: list[tuple[str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = server.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPES.get(Path(self.path).suffix, "text/html"))
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/app/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def deploy(self, path: str, body: bytes) -> None:
        self.files[path] = body

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
