"""Trending beyond the model: per-block aggregation and bad input, smoothing and caps, quality
on a simulated world, and the Ray job publishing lists that GET /v1/trending serves.

    .venv/bin/pytest tests/test_trending_job.py -q
"""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from app.config import TrendingSettings, WorldSettings, settings_from_args
from app.trending.aggregate import HOURLY, HourlyAggregator, combine, counters
from app.trending.ranking import apply_caps, empty_state, smooth
from training.trending import to_now_ms, trending_scores

NOW = pd.Timestamp("2026-11-01T00:00:00Z")


def _events(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "track_id": rng.choice(["a", "b", "c"], n),
            "event_type": rng.choice(["play", "like", "skip", "pause"], n),
            "timestamp": NOW - pd.to_timedelta(rng.uniform(0, 200, n), unit="h"),
            "locale": rng.choice(["en-US", "de-DE"], n),
        }
    )


def test_blocks_combine_to_the_same_counts_in_any_order():
    events = _events()
    agg = HourlyAggregator(to_now_ms(NOW), 168, 24, {"play": 1.0, "like": 2.0})
    whole = combine([agg(events)]).sort_by([("kind", "ascending"), ("track_id", "ascending"), ("locale", "ascending"), ("bucket", "ascending")])
    shuffled = events.sample(frac=1.0, random_state=3)
    parts = combine([agg(shuffled.iloc[:150]), agg(shuffled.iloc[150:])]).sort_by(
        [("kind", "ascending"), ("track_id", "ascending"), ("locale", "ascending"), ("bucket", "ascending")]
    )
    # first_ms is a per-track minimum (when a track was first seen), the rest per key
    assert whole.drop(["first_ms"]).equals(parts.drop(["first_ms"]))
    first = [t.to_pandas().groupby("track_id")["first_ms"].min() for t in (whole, parts)]
    pd.testing.assert_series_equal(first[0], first[1])
    hourly = whole.filter(pa.compute.equal(whole["kind"], HOURLY))
    assert sum(hourly["events"].to_pylist()) == len(events)  # every row accounted for


def test_parquet_pieces_read_as_dictionaries_give_the_same_counts(tmp_path):
    """The job's path (a file split into row-group pieces, strings read as Parquet
    dictionaries) counts exactly what the in-memory path counts; a file from an older export
    without a locale column still counts its events."""
    import pyarrow.parquet as pq

    from app.parquet_pieces import read_plan
    from app.trending.aggregate import aggregate_parquet

    events = _events(600, seed=4)
    agg = HourlyAggregator(to_now_ms(NOW), 168, 24, {"play": 1.0, "like": 2.0})
    path, old = tmp_path / "events.parquet", tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pandas(events, preserve_index=False), path, row_group_size=100)
    pq.write_table(pa.Table.from_pandas(events.drop(columns=["locale"]).iloc[:50], preserve_index=False), old)
    plan = read_plan([str(path), str(old)], rows_per_piece=350)
    assert [[len(groups) for _, groups in piece] for piece in plan] == [[4], [2, 1]]  # a large file split, a small one grouped
    keys = [("kind", "ascending"), ("track_id", "ascending"), ("locale", "ascending"), ("bucket", "ascending")]
    pieces = combine([aggregate_parquet(p, groups, agg, batch_rows=64) for piece in plan for p, groups in piece]).sort_by(keys)
    in_memory = combine([agg(events), agg(events.drop(columns=["locale"]).iloc[:50])]).sort_by(keys)
    assert pieces.equals(in_memory)
    assert sum(pieces.filter(pa.compute.equal(pieces["kind"], HOURLY))["events"].to_pylist()) == 650


def test_a_block_without_locales_merges_in_any_position():
    """Blocks come back in any order; one without a locale column (an older export, or events
    nobody sent a locale with) must not shift the other blocks' locale codes."""
    events = _events(300, seed=5)
    agg = HourlyAggregator(to_now_ms(NOW), 168, 24, {"play": 1.0, "like": 2.0})
    keys = [("kind", "ascending"), ("track_id", "ascending"), ("locale", "ascending"), ("bucket", "ascending")]
    bare, first, second = events.drop(columns=["locale"]).iloc[:40], events.iloc[:150], events.iloc[150:]
    expected = combine([agg(first), agg(second), agg(bare)]).sort_by(keys)
    for order in ([bare, first, second], [first, bare, second]):
        assert combine([agg(e) for e in order]).sort_by(keys).equals(expected)


def test_bad_events_are_counted_not_fatal():
    events = _events(50)
    bad = pd.DataFrame(
        {
            "track_id": [None, "a", "a"],
            "event_type": ["play", "play", "play"],
            "timestamp": [NOW - pd.Timedelta(hours=1), NOW + pd.Timedelta(hours=2), pd.NaT],
            "locale": [None, "en-US", None],
        }
    )
    agg = HourlyAggregator(to_now_ms(NOW), 168, 24, {"play": 1.0})
    combined = combine([agg(pd.concat([events, bad], ignore_index=True))])
    assert counters(combined) == {"future": 1, "invalid": 2}
    assert trending_scores(events.iloc[:0], NOW, TrendingSettings()).empty  # empty windows


def test_smoothing_carries_across_runs_and_a_retry_changes_nothing():
    now = to_now_ms(NOW)
    first, state = smooth(pd.DataFrame({"track_id": ["a"], "score": [10.0]}), empty_state(), "global", now, 6.0)
    later = pd.DataFrame({"track_id": ["a"], "score": [0.0]})
    six_hours, state2 = smooth(later, state, "global", now + 6 * 3_600_000, 6.0)
    assert first[0] == 10.0 and six_hours[0] == pytest.approx(5.0)  # half-life 6 h
    retry, _ = smooth(later, state2, "global", now + 6 * 3_600_000, 6.0)
    assert retry[0] == pytest.approx(5.0)


def test_caps_per_artist_genre_and_category():
    ranked = pd.DataFrame(
        {
            "track_id": list("abcdef"),
            "artist_id": ["x", "x", "x", "y", "z", "w"],
            "genre": ["rock", "rock", "rock", "rock", "jazz", "jazz"],
            "category": ["music", "music", "music", "music", "podcast", "podcast"],
        }
    )
    out = apply_caps(ranked, 10, max_per_artist=2, max_per_genre=3, category_caps={"music": 10, "podcast": 1, "other": 1})
    assert out["track_id"].tolist() == ["a", "b", "d", "e"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    from app.data.world import generate_world, load_world

    root = tmp_path_factory.mktemp("worlds")
    return [load_world(generate_world(WorldSettings(seed=2, n_breakouts=n), root / str(n), audio=False).root) for n in (5, 0)]


def test_breakouts_found_and_quiet_world_stays_quiet(worlds):
    """Default settings on a default-sized world: the breakouts (one of them released hours
    before it took off) are the list; the same world without breakouts lists at most one."""
    world, null = worlds
    end = pd.Timestamp(world.settings.end)
    listed = set(trending_scores(world.events, end, TrendingSettings(), tracks=world.tracks)["track_id"])
    truth = set(world.breakouts["track_id"])
    assert len(listed & truth) >= 4 and len(listed - truth) <= 1
    assert world.breakouts["track_id"].iloc[0] in listed  # the brand-new track
    assert len(trending_scores(null.events, end, TrendingSettings(), tracks=null.tracks)) <= 1


@pytest.mark.ray
def test_job_publishes_lists_served_by_the_api(worlds, tmp_path, redis_server, redis_client, serve_port):
    import httpx
    from ray import serve

    from deployments.app import build_app
    from jobs.trending import detect_trending

    world = worlds[0]
    prefix = f"tr{uuid.uuid4().hex[:6]}"
    args = {"redis": {"url": redis_server.url, "key_prefix": prefix}, "paths": {"state_dir": str(tmp_path)},
            "world": {"seed": 2}, "auth": {"enabled": False}}
    settings = settings_from_args(args)
    (tmp_path / "world").mkdir()
    world.tracks.drop(columns=["audio_path"]).to_parquet(tmp_path / "world" / "tracks.parquet")
    events = world.events
    stray = events.iloc[:3].assign(track_id="not-in-catalogue")
    shuffled = pd.concat([events, stray]).sample(frac=1.0, random_state=0)  # out of order on purpose
    for i, part in enumerate((shuffled.iloc[: len(shuffled) // 2], shuffled.iloc[len(shuffled) // 2 :])):
        (tmp_path / "events" / f"date={i}").mkdir(parents=True)
        part.to_parquet(tmp_path / "events" / f"date={i}" / "part.parquet")

    summary = detect_trending(settings)
    assert summary["counters"]["unknown_track"] == 3
    assert summary["events"] == len(events) + 3

    serve.run(build_app(args), name="trending-test", route_prefix="/trending-test")
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/trending-test", timeout=60)
        body = api.get("/v1/trending", params={"k": 5}).json()
        items = body["items"]
        assert body["list"] == "global" and 1 <= len(items) <= 5
        assert {"score", "velocity", "confidence"} <= set(items[0])
        assert set(world.breakouts["track_id"]) & {i["track_id"] for i in items}
        genre = items[0]["genre"]
        by_genre = api.get("/v1/trending", params={"genre": genre}).json()["items"]
        assert by_genre and all(i["genre"] == genre for i in by_genre)
        assert api.get("/v1/trending", params={"locale": "en-US", "k": 3}).status_code == 200
        bad = api.get("/v1/trending", params={"k": 0, "genre": "no/such"})
        assert bad.status_code == 422
        assert {tuple(e["loc"]) for e in bad.json()["detail"]} == {("query", "k"), ("query", "genre")}
    finally:
        serve.delete("trending-test")
