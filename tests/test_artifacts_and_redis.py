import redis
import pytest

from app.artifacts import ArtifactStore
from app.config import settings_from_args
from app.redis_server import EmbeddedRedis, RedisUnavailable, resolve_redis_url, stop_registered


def test_publish_is_atomic_and_manifest_verifies(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.publish("cf", {"params": {"factors": 4}}) as out:
        (out / "a.bin").write_bytes(b"abc")
    art = store.latest("cf")
    assert art.manifest["params"] == {"factors": 4}
    assert art.manifest["files"]["a.bin"]["bytes"] == 3
    assert store.verify(art) == []
    art.file("a.bin").write_bytes(b"tampered")
    assert store.verify(art) == ["a.bin"]


def test_failed_publish_keeps_previous_version(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.publish("cf") as out:
        (out / "a").write_text("1")
    good = store.latest_version("cf")
    with pytest.raises(RuntimeError):
        with store.publish("cf") as out:
            (out / "a").write_text("2")
            raise RuntimeError("job died")
    assert store.latest_version("cf") == good
    assert [p.name for p in (tmp_path / "cf").iterdir() if p.name.startswith(".staging")] == []


def test_republishing_an_older_version_rolls_back_with_its_files_and_metadata(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.publish("cf", meta={"params": {"alpha": 10.0}}) as out:
        (out / "sub").mkdir()
        (out / "sub" / "factors.bin").write_bytes(b"v1 factors")
    v1 = store.latest_version("cf")
    with store.publish("cf", meta={"params": {"alpha": 40.0}}) as out:
        (out / "sub").mkdir()
        (out / "sub" / "factors.bin").write_bytes(b"v2 factors")

    rolled_back = store.republish("cf", v1)
    latest = store.latest("cf")
    assert rolled_back == latest.version and rolled_back != v1
    assert latest.file("sub/factors.bin").read_bytes() == b"v1 factors"
    assert latest.manifest["params"] == {"alpha": 10.0} and store.verify(latest) == []
    with pytest.raises(FileNotFoundError, match="trending"):
        store.republish("trending")


def test_embedded_redis_registers_persists_and_stops(tmp_path):
    settings = settings_from_args({"paths": {"state_dir": str(tmp_path)}})
    with pytest.raises(RedisUnavailable, match="no redis.url configured"):
        resolve_redis_url(settings)
    server = EmbeddedRedis(settings.paths.redis_dir, appendonly=True).start()
    server.register()
    url = resolve_redis_url(settings)
    assert url == server.url
    redis.Redis.from_url(url).set("k", "v")
    pid = server.process.pid
    assert stop_registered(settings.paths.redis_dir)
    server.process.wait(5)
    # append-only file: a new server on the same folder still has the acknowledged write
    again = EmbeddedRedis(settings.paths.redis_dir, appendonly=True).start()
    try:
        assert redis.Redis.from_url(again.url).get("k") == b"v"
        assert again.process.pid != pid
    finally:
        again.stop()


def test_configured_url_wins(tmp_path):
    settings = settings_from_args({"redis": {"url": "redis://example:1/0"}, "paths": {"state_dir": str(tmp_path)}})
    assert resolve_redis_url(settings) == "redis://example:1/0"


def test_model_cache_reloads_a_new_version_and_keeps_the_one_it_replaced(tmp_path):
    """A replica picks up a publish the next time it looks for one, not before, and keeps the
    bundle it replaced: a request already under way may carry positions in that catalogue."""
    import numpy as np
    import pandas as pd

    from app.models import ModelCache

    store = ArtifactStore(tmp_path)

    def publish(ids):
        with store.publish("content") as out:
            pd.DataFrame({"track_id": ids, "artist_id": "a", "genre": "rock"}).to_parquet(out / "tracks.parquet")
            np.save(out / "embeddings.npy", np.eye(len(ids), dtype=np.float32))
        return store.latest_version("content")

    # As a replica builds it: get() loads only what was never loaded; refresh() looks again.
    cache = ModelCache(store, interval_s=float("inf"))
    v1 = publish(["t1", "t2"])
    first = cache.get()
    assert first.versions["content"] == v1 and cache.previous is None
    v2 = publish(["t2", "t3", "t4"])
    assert cache.get() is first
    assert cache.refresh() is True
    reloaded = cache.get()
    assert reloaded.versions["content"] == v2 and list(reloaded.track_ids) == ["t2", "t3", "t4"]
    assert cache.previous is first
    assert cache.refresh() is False and cache.get() is reloaded  # nothing new: nothing reloaded
