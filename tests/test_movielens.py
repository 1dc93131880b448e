"""MovieLens 100K loads from the verified cache, from upstream-format files, and refuses data
that is not exactly ML-100K.

Uses the real cache (~/.cache/echotune) so the 2 MB download happens once per machine.

    .venv/bin/pytest tests/test_movielens.py -q
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from app.config import PathSettings
from app.data import movielens
from app.data.movielens import ChecksumError, MovieLens, UPSTREAM_GENRES, load_movielens_100k

CACHE_DIR = PathSettings().cache_dir.expanduser()


@pytest.fixture(scope="module")
def ml() -> MovieLens:
    return load_movielens_100k(CACHE_DIR)


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to run pip fails the test: the cache must be enough."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_loads_the_full_benchmark(ml):
    inter, items = ml.interactions, ml.items
    assert len(inter) == 100_000
    assert inter.user_id.nunique() == 943
    assert inter.item_id.nunique() == 1682
    assert len(items) == 1682 and items.item_id.is_unique
    assert {c: str(t) for c, t in inter.dtypes.items()} == {
        "user_id": "int64",
        "item_id": "int64",
        "rating": "float64",
        "timestamp": "datetime64[ms, UTC]",
    }
    assert list(items.columns) == ["item_id", "title", "year", "genres"]
    assert set(inter.rating.unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert inter.timestamp.min() >= pd.Timestamp("1997-09-01", tz="UTC")
    assert inter.timestamp.max() < pd.Timestamp("1998-05-01", tz="UTC")
    toy_story = items.set_index("item_id").loc[1]
    assert toy_story.title == "Toy Story" and toy_story.year == 1995
    assert list(toy_story.genres) == ["Animation", "Children's", "Comedy"]
    assert {g for genres in items.genres for g in genres} <= set(UPSTREAM_GENRES)


def test_second_load_reads_the_cache_without_downloading(ml, no_download):
    again = load_movielens_100k(CACHE_DIR)
    assert again.interactions.equals(ml.interactions)


def _copy_cache(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-100k"
    shutil.copytree(CACHE_DIR / "ml-100k", folder)
    return folder


def test_corrupt_cache_raises_naming_the_file_and_both_digests(ml, tmp_path, no_download):
    folder = _copy_cache(tmp_path)
    inter = folder / "ml-100k.inter"
    data = bytearray(inter.read_bytes())
    data[-3] = ord("9") if data[-3] != ord("9") else ord("8")  # one digit of the last timestamp
    inter.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as excinfo:
        load_movielens_100k(tmp_path)
    message = str(excinfo.value)
    assert str(inter) in message
    assert movielens.FILE_SHA256["ml-100k.inter"] in message
    assert movielens._sha256(bytes(data)) in message
    assert isinstance(excinfo.value, ValueError)


def test_local_recbole_copy_is_accepted_and_verified(ml, tmp_path, no_download):
    folder = _copy_cache(tmp_path)
    local = load_movielens_100k(tmp_path / "elsewhere", source=folder / "ml-100k.inter")
    assert local.interactions.equals(ml.interactions)
    (folder / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\n")
    with pytest.raises(ChecksumError, match="ml-100k.item"):
        load_movielens_100k(tmp_path, source=folder)


def _write_upstream(ml: MovieLens, folder: Path, drop_last: bool = False) -> Path:
    """GroupLens' own format: u.data (tab-separated, no header) and u.item (pipe, Latin-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    inter = ml.interactions.iloc[:-1] if drop_last else ml.interactions
    seconds = inter.timestamp.astype("datetime64[s, UTC]").astype("int64")
    lines = [f"{u}\t{i}\t{int(r)}\t{s}" for u, i, r, s in zip(inter.user_id, inter.item_id, inter.rating, seconds)]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    rows = []
    for item in ml.items.itertuples():
        title = item.title if pd.isna(item.year) else f"{item.title} ({item.year})"
        date = "" if pd.isna(item.year) else f"01-Jan-{item.year}"
        flags = "|".join("1" if g in item.genres else "0" for g in UPSTREAM_GENRES)
        rows.append(f"{item.item_id}|{title}|{date}||http://example.invalid/{item.item_id}|{flags}")
    (folder / "u.item").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    return folder


def test_upstream_grouplens_files_and_zip_are_accepted(ml, tmp_path, no_download):
    folder = _write_upstream(ml, tmp_path / "ml-100k")
    from_dir = load_movielens_100k(tmp_path / "cache", source=folder / "u.data")
    assert from_dir.interactions.equals(ml.interactions)
    dated = ml.items.year.notna().to_numpy()  # RecBole's undated rows lost their year in conversion
    assert from_dir.items[dated].drop(columns="genres").equals(ml.items[dated].drop(columns="genres"))
    assert [sorted(g) for g in from_dir.items.genres] == [sorted(g) for g in ml.items.genres]

    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("u.data", "u.item"):
            zf.write(folder / name, f"ml-100k/{name}")
    assert load_movielens_100k(tmp_path / "cache", source=archive).interactions.equals(ml.interactions)


def test_upstream_files_with_different_ratings_are_refused(ml, tmp_path, no_download):
    folder = _write_upstream(ml, tmp_path / "ml-100k", drop_last=True)
    with pytest.raises(ChecksumError, match=r"ratings in .*u\.data.*99999 rows"):
        load_movielens_100k(tmp_path, source=folder / "u.data")
