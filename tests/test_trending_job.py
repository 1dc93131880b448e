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
import redis

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


def test_events_are_known_by_the_configured_catalogue_not_the_simulated_world(tmp_path):
    """With content.catalog_path set, its tracks are the known ones (read with the content job's
    column aliases), and a track only the simulated world has is unknown."""
    from jobs.trending import build_lists, read_catalogue

    catalogue = tmp_path / "catalogue.parquet"
    settings = settings_from_args({"paths": {"state_dir": str(tmp_path)}, "content": {"catalog_path": str(catalogue)}})
    settings.paths.world_dir.mkdir(parents=True)
    pd.DataFrame({"track_id": ["w1"], "genre": ["rock"]}).to_parquet(settings.paths.world_dir / "tracks.parquet")
    pd.DataFrame(
        {"track_id": ["r1", "r2", None], "uri": ["s3://m/r1.ogg", "s3://m/r2.ogg", "s3://m/x.ogg"],
         "genres": [["jazz"], ["rock", "pop"], []], "year": [2020, 2021, 2022], "artist": ["A", "B", "C"]}
    ).to_parquet(catalogue)

    known = read_catalogue(settings).set_index("track_id")
    assert sorted(known.index) == ["r1", "r2"]  # the row without an id is no track
    assert known.loc["r2", ["genre", "artist_id"]].tolist() == ["rock", "B"]
    assert known.loc["r2", "release_date"] == pd.Timestamp("2021-01-01", tz="UTC")

    plays = pd.DataFrame(
        {"track_id": ["r1"] * 6 + ["r2"] * 4 + ["w1"] * 3, "event_type": "play",
         "timestamp": NOW - pd.to_timedelta(np.arange(1, 14), unit="h")}
    )
    combined = combine([HourlyAggregator(to_now_ms(NOW), 168, 24, {"play": 1.0})(plays)])
    counted = build_lists(combined, to_now_ms(NOW), TrendingSettings(), read_catalogue(settings), empty_state())["counters"]
    assert counted["unknown_track"] == 3 and counted["scored"] == 10


def test_a_configured_catalogue_that_is_missing_fails_loudly(tmp_path):
    from jobs.trending import read_catalogue

    settings = settings_from_args({"paths": {"state_dir": str(tmp_path)}, "content": {"catalog_path": str(tmp_path / "nope.parquet")}})
    with pytest.raises(FileNotFoundError, match="content.catalog_path"):
        read_catalogue(settings)


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


class PauseBeforeDetails(redis.Connection):
    """A connection that sends a pipeline in two writes, the commands before the detail hash's
    HGETALL and then the rest, and runs `between` in the gap: another run's swap landing
    exactly between top()'s two reads, as it can when the pipeline's bytes arrive apart."""

    between = None

    def pack_commands(self, commands):
        return [b"".join(self.pack_command(*args)) for args in commands]  # one chunk per command

    def send_packed_command(self, command, check_health=True):
        heads = [bytes(c[:40]) for c in command] if isinstance(command, list) else []
        split = next((i for i, head in enumerate(heads) if b"HGETALL" in head), None)
        if not split or PauseBeforeDetails.between is None:
            return super().send_packed_command(command, check_health)
        between, PauseBeforeDetails.between = PauseBeforeDetails.between, None
        super().send_packed_command(command[:split], check_health)
        between()
        return super().send_packed_command(command[split:], check_health)


def test_a_swap_between_the_two_reads_of_top_never_mixes_two_runs(redis_server, redis_client):
    """top() reads a list's ranks and its details; if a publish swaps both in between, each
    track must still come with its own run's details (here: its score equals its rank score)."""
    from app.trending.lists import TrendingLists

    def run(tracks: str, score: float) -> dict:
        frame = pd.DataFrame({"track_id": list(tracks), "rank_score": [score] * len(tracks), "score": [score] * len(tracks)})
        return {"global": frame}

    TrendingLists(redis_client, "pt").publish("v1", run("ab", 1.0), ttl_s=60)
    pool = redis.ConnectionPool.from_url(redis_server.url, connection_class=PauseBeforeDetails)
    reader = TrendingLists(redis.Redis(connection_pool=pool), "pt")
    PauseBeforeDetails.between = lambda: TrendingLists(redis_client, "pt").publish("v2", run("cd", 2.0), ttl_s=60)
    top = reader.top("global", k=5)
    assert PauseBeforeDetails.between is None  # the swap did land between the two reads
    assert top and all(item.get("score") == item["rank_score"] for item in top), top
