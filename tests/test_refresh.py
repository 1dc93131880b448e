"""BackgroundRefresh: what keeps a replica's models, lists and experiments current without a
request ever waiting for a reload."""

from __future__ import annotations

import threading

import pytest

from app.artifacts import ArtifactStore
from app.refresh import BackgroundRefresh


def test_a_failing_refresh_is_retried_at_the_next_tick_and_stop_ends_the_thread():
    calls = []

    def refresh():
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise OSError("artifact half written")
        refresher._stop.set()  # the second call: the retry happened, let the thread end

    told = []

    def count_failure(name):  # and fail at it: a metric that cannot be recorded ends nothing
        told.append(name)
        raise RuntimeError("metrics agent gone")

    refresher = BackgroundRefresh(refresh, interval_s=0.01, name="models", on_failure=count_failure)
    refresher.start()
    refresher._thread.join()  # ends only once the second call has happened
    refresher.stop()
    assert len(calls) == 2, "the refresh was not tried again after a failure"
    assert refresher.failures == 1 and told == ["models"]
    assert calls[0] == "echotune-refresh-models" != threading.current_thread().name
    assert not refresher._thread.is_alive()  # joined: nothing is called after stop()


def test_a_first_refresh_that_fails_is_counted_and_does_not_raise():
    """A replica calls refresh_now in __init__: one that cannot load yet (Redis down) must
    still start, and the failure is counted as a tick's would be."""
    told = []

    def refresh():
        raise ConnectionError("redis down")

    refresher = BackgroundRefresh(refresh, interval_s=60, name="experiments", on_failure=told.append)
    assert refresher.refresh_now() is False
    assert refresher.failures == 1 and told == ["experiments"]
    assert BackgroundRefresh(lambda: None, interval_s=60, name="x").refresh_now() is True


def test_an_interval_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="interval_s"):
        BackgroundRefresh(lambda: None, interval_s=0, name="x")


def test_a_serving_replica_has_its_models_at_start_and_picks_up_a_publish_with_no_request(tmp_path):
    import numpy as np
    import pandas as pd

    from app.config import settings_from_args
    from deployments.tuning import ModelServing

    settings = settings_from_args({"paths": {"state_dir": str(tmp_path)}, "serving": {"reload_interval_s": 0.05}})
    store = ArtifactStore(settings.paths.artifacts_dir)

    def publish(ids):
        with store.publish("content") as out:
            pd.DataFrame({"track_id": ids, "artist_id": "a", "genre": "rock"}).to_parquet(out / "tracks.parquet")
            np.save(out / "embeddings.npy", np.eye(len(ids), dtype=np.float32))
        return store.latest_version("content")

    v1 = publish(["t1", "t2"])
    replica = ModelServing(settings)
    reloaded = threading.Event()
    cache_refresh = replica.models.refresh

    def refresh_and_tell() -> bool:  # what the replica's background thread calls, observed
        changed = cache_refresh()
        if changed:
            reloaded.set()
        return changed

    replica.models.refresh = refresh_and_tell
    try:
        first = replica.models.bundle  # loaded in __init__, before Serve routes a request here
        assert first.versions["content"] == v1
        v2 = publish(["t2", "t3", "t4"])
        reloaded.wait()  # no request is made: only the background thread can reload
        assert replica.models.bundle.versions["content"] == v2 and replica.models.previous is first
    finally:
        replica.refresher.stop()


def test_candidates_carry_their_ids_for_a_few_refreshes_after_a_load(tmp_path):
    """ModelServing.named: the next stage may not hold a catalog this replica has just loaded
    until its own next refreshes."""
    import numpy as np
    import pandas as pd

    from app.config import settings_from_args
    from app.recommend import Retrieved
    from deployments.tuning import ModelServing

    settings = settings_from_args({"paths": {"state_dir": str(tmp_path)}, "serving": {"reload_interval_s": 3600}})
    store = ArtifactStore(settings.paths.artifacts_dir)

    def publish():
        with store.publish("content") as out:
            pd.DataFrame({"track_id": ["t1"], "artist_id": "a", "genre": "rock"}).to_parquet(out / "tracks.parquet")
            np.save(out / "embeddings.npy", np.eye(1, dtype=np.float32))

    def named() -> bool:
        return replica.named([Retrieved(["t1"], np.ones(1), np.zeros(1, np.int64), "v")])[0].named

    publish()
    replica = ModelServing(settings)  # loads it; its own ticks are an hour apart
    try:
        assert named()
        for _ in range(ModelServing.NAMED_TICKS):
            replica.refresh()  # nothing new
        assert not named()
        publish()
        replica.refresh()
        assert named()
    finally:
        replica.refresher.stop()
