"""The simulated world is deterministic and contains what it promises: focused listeners,
breakouts with a known start, brand-new releases and clips whose tempo librosa can hear.

    .venv/bin/pytest tests/test_world.py -q
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from app.config import WorldSettings
from app.data.world import generate_world, load_world

TINY = dict(n_users=30, n_artists=12, n_tracks=60, genres=["rock", "pop", "jazz", "classical"], days=3)
TS = pa.timestamp("ms", tz="UTC")


@pytest.fixture(scope="module")
def settings() -> WorldSettings:
    return WorldSettings(seed=11, **TINY)


@pytest.fixture(scope="module")
def world(tmp_path_factory, settings):
    root = tmp_path_factory.mktemp("world")
    generate_world(settings, root)
    return load_world(root)


def _digests(root: Path) -> dict[str, str]:
    files = sorted(root.glob("*.parquet")) + sorted((root / "audio").glob("*.wav")) + [root / "world.json"]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def test_same_settings_give_byte_identical_files(tmp_path, settings):
    generate_world(settings, tmp_path / "a")
    first = _digests(tmp_path / "a")
    generate_world(settings, tmp_path / "a")
    assert _digests(tmp_path / "a") == first
    assert len([name for name in first if name.endswith(".wav")]) == settings.n_tracks

    # Elsewhere and without audio: everything but the audio paths is still identical, so the
    # audio flag does not shift any other random draw.
    generate_world(settings, tmp_path / "b", audio=False)
    second = _digests(tmp_path / "b")
    for name in ("events.parquet", "users.parquet", "artists.parquet", "breakouts.parquet"):
        assert second[name] == first[name], name
    tracks_a = pq.read_table(tmp_path / "a" / "tracks.parquet").drop_columns(["audio_path"])
    tracks_b = pq.read_table(tmp_path / "b" / "tracks.parquet")
    assert tracks_b.column("audio_path").null_count == settings.n_tracks
    assert tracks_b.drop_columns(["audio_path"]).equals(tracks_a)


def test_different_seed_gives_a_different_world(tmp_path, settings, world):
    other = load_world(generate_world(settings.model_copy(update={"seed": 12}), tmp_path, audio=False).root)
    assert not other.events.drop(columns="event_id").equals(world.events.drop(columns="event_id"))
    assert set(other.events.event_id).isdisjoint(world.events.event_id)
    assert not other.tracks.tempo_bpm.equals(world.tracks.tempo_bpm)


def test_parquet_schemas(world):
    expected = {
        "artists": [
            ("artist_id", pa.string()), ("name", pa.string()), ("genre", pa.string()), ("popularity", pa.float64()),
        ],
        "tracks": [
            ("track_id", pa.string()), ("title", pa.string()), ("artist_id", pa.string()),
            ("artist_name", pa.string()), ("album", pa.string()), ("genres", pa.list_(pa.string())),
            ("genre", pa.string()), ("release_year", pa.int64()), ("release_date", TS),
            ("duration_ms", pa.int64()), ("explicit", pa.bool_()), ("category", pa.string()),
            ("tempo_bpm", pa.float64()), ("key", pa.string()), ("audio_path", pa.string()),
        ],
        "users": [
            ("user_id", pa.string()), ("top_genre", pa.string()), ("taste", pa.list_(pa.float64())),
            ("locale", pa.string()), ("country", pa.string()), ("device", pa.string()), ("activity", pa.string()),
        ],
        "events": [
            ("event_id", pa.string()), ("user_id", pa.string()), ("track_id", pa.string()),
            ("event_type", pa.string()), ("timestamp", TS), ("session_id", pa.string()),
            ("duration_ms", pa.int64()), ("device", pa.string()), ("locale", pa.string()),
        ],
        "breakouts": [("track_id", pa.string()), ("breakout_at", TS)],
    }
    for name, fields in expected.items():
        schema = pq.read_schema(getattr(world.paths, name))
        assert [(f.name, f.type) for f in schema] == fields, name
    assert str(world.events.timestamp.dtype) == "datetime64[ms, UTC]"
    assert str(world.tracks.release_date.dtype) == "datetime64[ms, UTC]"


def test_catalogue_and_users_are_consistent(world, settings):
    tracks, artists, users = world.tracks, world.artists, world.users
    assert len(tracks) == settings.n_tracks and len(artists) == settings.n_artists and len(users) == settings.n_users
    assert tracks.track_id.str.fullmatch(r"t\d{5}").all() and tracks.track_id.is_unique
    assert artists.artist_id.str.fullmatch(r"a\d{4}").all() and users.user_id.str.fullmatch(r"u\d{4}").all()
    assert set(tracks.genre) == set(settings.genres)
    assert all(1 <= len(g) <= 2 and g[0] == p for g, p in zip(tracks.genres, tracks.genre))
    artist_genre = artists.set_index("artist_id").genre
    assert (tracks.genre.to_numpy() == artist_genre.reindex(tracks.artist_id).to_numpy()).all()
    assert (tracks.category == "music").all()
    assert tracks.key.str.fullmatch(r"[A-G]#? (major|minor)").all()
    assert tracks.duration_ms.between(90_000, 900_000).all()
    taste = np.stack(users.taste.to_numpy())
    assert np.allclose(taste.sum(axis=1), 1.0)
    assert (users.top_genre.to_numpy() == np.array(settings.genres)[taste.argmax(axis=1)]).all()
    assert set(users.device) <= {"mobile", "desktop", "tablet", "tv"}
    assert set(users.activity) <= {"light", "casual", "heavy"}


def test_events_are_sorted_inside_the_window_and_well_formed(world, settings):
    events = world.events
    end = pd.Timestamp(settings.end)
    assert events.timestamp.is_monotonic_increasing
    assert events.timestamp.min() >= end - timedelta(days=settings.days)
    assert events.timestamp.max() < end
    assert events.event_id.is_unique
    assert set(events.event_type) == {"play", "skip", "like", "dislike"}
    assert set(events.user_id) <= set(world.users.user_id)
    assert set(events.track_id) <= set(world.tracks.track_id)
    listened = events[events.event_type.isin(["play", "skip"])]
    assert (listened.duration_ms > 0).all()
    assert listened[listened.event_type == "skip"].duration_ms.max() <= 30_000
    # Every like/dislike comes right after a play of that track in the same session.
    for row in events[events.event_type.isin(["like", "dislike"])].itertuples():
        before = events[(events.session_id == row.session_id) & (events.timestamp <= row.timestamp)]
        assert before[before.event_type.isin(["play", "skip"])].iloc[-1].track_id == row.track_id
        assert before[before.track_id == row.track_id].event_type.isin(["play"]).any()
    # No track is heard before its release.
    release = world.tracks.set_index("track_id").release_date
    assert (events.timestamp.to_numpy() >= release.reindex(events.track_id).to_numpy()).all()


def test_sessions_belong_to_one_user_and_do_not_overlap(world):
    events = world.events
    assert (events.groupby("session_id").user_id.nunique() == 1).all()
    spans = events.groupby("session_id").agg(
        user=("user_id", "first"), start=("timestamp", "min"), end=("timestamp", "max")
    )
    for _, sessions in spans.sort_values("start").groupby("user"):
        gaps = sessions.start.to_numpy()[1:] - sessions.end.to_numpy()[:-1]
        assert (gaps > np.timedelta64(30, "m")).all()


def test_focused_users_listen_mostly_to_their_top_genre(world, settings):
    users = world.users.set_index("user_id")
    focused = users[users.taste.map(max) >= 0.8]
    assert len(focused) >= 0.2 * settings.n_users
    plays = world.events[world.events.event_type == "play"]
    plays = plays[plays.user_id.isin(focused.index)]
    genre = world.tracks.set_index("track_id").genre.reindex(plays.track_id).to_numpy()
    on_top = pd.Series(genre == focused.top_genre.reindex(plays.user_id).to_numpy(), index=plays.user_id.to_numpy())
    assert on_top.mean() >= 0.8
    per_user = on_top.groupby(level=0).agg(["mean", "size"])
    assert (per_user[per_user["size"] >= 15]["mean"] >= 0.7).all(), per_user


def test_breakouts_take_off_at_their_breakout_time(world, settings):
    end = pd.Timestamp(settings.end)
    start = end - timedelta(days=settings.days)
    breakouts = world.breakouts
    assert len(breakouts) == settings.n_breakouts and breakouts.track_id.is_unique
    assert (breakouts.breakout_at >= end - timedelta(hours=24)).all() and (breakouts.breakout_at < end).all()
    release = world.tracks.set_index("track_id").release_date
    plays = world.events[world.events.event_type == "play"]
    for row in breakouts.itertuples():
        heard = plays[plays.track_id == row.track_id].timestamp
        since = max(start, release[row.track_id])
        before_per_h = (heard < row.breakout_at).sum() / ((row.breakout_at - since).total_seconds() / 3600)
        after_per_h = (heard >= row.breakout_at).sum() / ((end - row.breakout_at).total_seconds() / 3600)
        assert after_per_h > 2 * before_per_h, (row.track_id, before_per_h, after_per_h)
    released = release.reindex(breakouts.track_id).reset_index(drop=True)
    brand_new = released >= start
    assert brand_new.any()
    assert (released[brand_new] < breakouts.breakout_at[brand_new]).all()


def test_new_releases_exist(world, settings):
    start = pd.Timestamp(settings.end) - timedelta(days=settings.days)
    new = world.tracks[world.tracks.release_date >= start]
    assert len(new) >= 1
    assert (world.tracks.release_year == world.tracks.release_date.dt.year).all()


def test_audio_clips_are_readable_16_bit_mono(world, settings):
    for path in world.tracks.audio_path.head(5):
        assert Path(path).is_absolute()
        info = sf.info(path)
        assert info.samplerate == settings.sample_rate
        assert info.channels == 1 and info.subtype == "PCM_16"
        assert info.frames == round(settings.clip_seconds * settings.sample_rate)
        samples, _ = sf.read(path)
        assert 0.5 < np.abs(samples).max() <= 1.0


def test_librosa_hears_the_true_tempo(world):
    librosa = pytest.importorskip("librosa")
    one_per_genre = world.tracks.groupby("genre").head(1)
    for row in one_per_genre.itertuples():
        y, sr = librosa.load(row.audio_path, sr=None)
        estimate = float(librosa.feature.tempo(y=y, sr=sr)[0])
        ratio = estimate / row.tempo_bpm
        near = any(abs(ratio - octave) / octave < 0.08 for octave in (0.5, 1.0, 2.0))
        assert near, (row.genre, row.tempo_bpm, estimate)


def test_load_world_without_a_world_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="generate_world"):
        load_world(tmp_path)
