"""The catalogue contract of the content job: common spellings accepted, unusable rows set
aside with their reason, nothing silently dropped.

    .venv/bin/pytest tests/test_content_catalog.py -q
"""

from __future__ import annotations

import pandas as pd
import pytest

from app.data.audio_catalog import CATALOG_COLUMNS, normalise_catalog, parse_immich_license


def test_aliases_map_onto_the_catalogue_columns():
    raw = pd.DataFrame(
        {
            "track_id": ["a", "b"],
            "audio_uri": ["s3://bucket/a.ogg", "/music/b.flac"],
            "artist": ["x", "y"],
            "year": [2001, None],
            "genre": ["rock", None],
            "duration_s": [10.0, -1.0],
        }
    )
    tracks, rejected = normalise_catalog(raw)
    assert rejected.empty
    assert list(tracks.columns[: len(CATALOG_COLUMNS)]) == CATALOG_COLUMNS
    assert tracks["audio_path"].tolist() == ["s3://bucket/a.ogg", "/music/b.flac"]
    assert tracks["artist_id"].tolist() == ["x", "y"]
    assert tracks["genres"].tolist() == [["rock"], []]
    assert tracks["duration_ms"].iloc[0] == 10_000 and pd.isna(tracks["duration_ms"].iloc[1])  # negative: unknown
    assert tracks["release_date"].iloc[0] == pd.Timestamp("2001-01-01", tz="UTC")


def test_rows_that_cannot_be_tracks_are_set_aside_with_their_reason():
    raw = pd.DataFrame({"track_id": ["a", None, "a", " "], "audio_path": ["1", "2", "3", "4"]})
    tracks, rejected = normalise_catalog(raw)
    assert tracks["track_id"].tolist() == ["a"] and tracks["audio_path"].tolist() == ["1"]
    assert sorted(rejected["reason"]) == ["duplicate_track_id", "no_track_id", "no_track_id"]


def test_a_catalogue_without_audio_or_ids_is_refused_naming_the_column():
    with pytest.raises(ValueError, match="audio_path"):
        normalise_catalog(pd.DataFrame({"track_id": ["a"]}))
    with pytest.raises(ValueError, match="track_id"):
        normalise_catalog(pd.DataFrame({"audio_path": ["a"]}))


def test_immich_license_table_is_parsed_with_sharps():
    text = """calm/
  calm_acoustic_1.opus                 68 bpm  C major   seed 101  [acoustic]
  nostalgic_electronic_2.opus          84 bpm  Bb minor  seed 202  [electronic]
"""
    table = parse_immich_license(text)
    assert table.to_dict("records") == [
        {"file": "calm_acoustic_1.opus", "tempo_bpm": 68.0, "key": "C major", "seed": 101, "tag": "acoustic"},
        {"file": "nostalgic_electronic_2.opus", "tempo_bpm": 84.0, "key": "A# minor", "seed": 202, "tag": "electronic"},
    ]
    with pytest.raises(ValueError, match="no track table"):
        parse_immich_license("All music here was generated locally.")
