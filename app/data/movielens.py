"""MovieLens 100K, the public benchmark EchoTune's collaborative filtering is measured on.

The data's terms (GroupLens: research use, no redistribution) forbid committing it, and these
machines reach package registries but not grouplens.org. So by default the loader fetches the
RecBole 1.2.1 wheel from PyPI (2.1 MB, never installed: it would pull in torch), extracts the
copy of ML-100K RecBole ships, and checks it against SHA-256 digests recorded here. Later calls
read the verified cache and download nothing.

On a machine with internet the upstream files work too: pass `source=` pointing at GroupLens'
`ml-100k.zip`, its extracted folder, its `u.data`, or a RecBole-style `ml-100k.inter`. Every
source is checked against one digest of the 100,000 ratings themselves (independent of file
format and row order), so a truncated or different data set is refused whatever its shape.

    ml = load_movielens_100k(settings.paths.cache_dir)
    ml.interactions  # user_id, item_id, rating, timestamp (100,000 rows)
    ml.items         # item_id, title, year, genres (1,682 rows)
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from app.config import PathSettings

logger = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
_WHEEL_MEMBER = "recbole/dataset_example/ml-100k/{name}"
INTER_FILE = "ml-100k.inter"
ITEM_FILE = "ml-100k.item"
FILE_SHA256 = {
    INTER_FILE: "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    ITEM_FILE: "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
"""Digests of the files as RecBole 1.2.1 ships them (computed once from the wheel)."""
RATINGS_SHA256 = "ec862504a8c24b195f5194e51fb18bb2d59428d00d96d6d1c63433a3bd5f2f47"
"""Digest of the ratings as int64 (user, item, rating, unix seconds) rows sorted ascending:
the same for every file format that carries the 100K ratings."""
N_RATINGS, N_USERS, N_ITEMS = 100_000, 943, 1_682

# GroupLens' u.item has 19 genre flags in this order.
UPSTREAM_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)


class ChecksumError(ValueError):
    """Data on disk is not the data this loader was written for."""


@dataclass(frozen=True)
class MovieLens:
    interactions: pd.DataFrame
    """user_id int64, item_id int64, rating float64, timestamp datetime64[ms, UTC]; file order."""
    items: pd.DataFrame
    """item_id int64, title str, year Int64 (missing for the one undated item), genres list[str]."""
    source: Path
    """The ratings file (or zip) the data was read from."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_file_digest(name: str, data: bytes, where: Path | str) -> None:
    actual = _sha256(data)
    expected = FILE_SHA256[name]
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch for {where}: expected SHA-256 {expected}, got {actual}. "
            f"The file is corrupt or not the ML-100K copy from {RECBOLE_REQUIREMENT}; "
            f"delete it to download it again."
        )


def ratings_digest(interactions: pd.DataFrame) -> str:
    """Format- and order-independent digest of the ratings (see RATINGS_SHA256)."""
    rows = np.column_stack(
        [
            interactions["user_id"].to_numpy(np.int64),
            interactions["item_id"].to_numpy(np.int64),
            np.rint(interactions["rating"].to_numpy(np.float64)).astype(np.int64),
            interactions["timestamp"].astype("datetime64[s, UTC]").astype("int64").to_numpy(),
        ]
    )
    rows = rows[np.lexsort(rows.T[::-1])]
    return _sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes())


def _check_ratings(interactions: pd.DataFrame, where: Path | str) -> None:
    actual = ratings_digest(interactions)
    if actual != RATINGS_SHA256:
        raise ChecksumError(
            f"checksum mismatch for the ratings in {where}: expected SHA-256 {RATINGS_SHA256}, got {actual} "
            f"({len(interactions)} rows, {interactions['user_id'].nunique()} users, "
            f"{interactions['item_id'].nunique()} items; MovieLens 100K has {N_RATINGS}, {N_USERS}, {N_ITEMS})"
        )


def _interactions(users, items, ratings, seconds) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.asarray(users, dtype=np.int64),
            "item_id": np.asarray(items, dtype=np.int64),
            "rating": np.asarray(ratings, dtype=np.float64),
            "timestamp": pd.to_datetime(np.asarray(seconds, dtype=np.int64), unit="s", utc=True).as_unit("ms"),
        }
    )


def _parse_recbole_inter(data: bytes) -> pd.DataFrame:
    frame = pd.read_csv(io.BytesIO(data), sep="\t", header=0)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return _interactions(frame["user_id"], frame["item_id"], frame["rating"], frame["timestamp"].astype(np.int64))


def _parse_upstream_data(data: bytes) -> pd.DataFrame:
    frame = pd.read_csv(io.BytesIO(data), sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"])
    return _interactions(frame["user_id"], frame["item_id"], frame["rating"], frame["timestamp"])


def _year(value: object) -> int | None:
    text = str(value).strip()
    return int(text) if text.isdigit() else None


def _items(ids, titles, years, genres) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": np.asarray(ids, dtype=np.int64),
            "title": pd.Series(list(titles), dtype="str"),
            "year": pd.array(list(years), dtype="Int64"),
            "genres": list(genres),
        }
    )


def _parse_recbole_item(data: bytes) -> pd.DataFrame:
    frame = pd.read_csv(io.BytesIO(data), sep="\t", header=0, dtype=str, keep_default_na=False)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return _items(
        frame["item_id"].astype(np.int64),
        frame["movie_title"],
        [_year(v) for v in frame["release_year"]],
        [v.split() for v in frame["class"]],
    )


def _parse_upstream_item(data: bytes) -> pd.DataFrame:
    """u.item: pipe-separated Latin-1, `id|Title (Year)|date|video date|url|19 genre flags`."""
    ids, titles, years, genres = [], [], [], []
    for line in data.decode("latin-1").splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 5 + len(UPSTREAM_GENRES):
            raise ValueError(f"u.item: expected {5 + len(UPSTREAM_GENRES)} fields, got {len(fields)} in {line!r}")
        match = re.match(r"^(.*?)\s*\((\d{4})\)\s*$", fields[1])
        ids.append(int(fields[0]))
        titles.append(match.group(1) if match else fields[1])
        years.append(int(match.group(2)) if match else _year(fields[2][-4:]))
        genres.append([g for g, flag in zip(UPSTREAM_GENRES, fields[5:]) if flag.strip() == "1"])
    return _items(ids, titles, years, genres)


def _download_into(target: Path) -> None:
    """Fetch the RecBole wheel with pip (the registry is the one source reachable everywhere
    EchoTune runs), verify both files, then move them in place so a crash never leaves a
    half-written cache behind."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ml-100k-download-") as tmp:
        tmp_dir = Path(tmp)
        logger.info("downloading MovieLens 100K via pip (%s) into %s", RECBOLE_REQUIREMENT, target)
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", RECBOLE_REQUIREMENT, "-d", str(tmp_dir),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"could not download {RECBOLE_REQUIREMENT} (exit {result.returncode}): "
                f"{result.stderr.strip()[-2000:]}\n"
                f"Alternatively pass source= pointing at GroupLens' ml-100k.zip or u.data."
            )
        wheels = sorted(tmp_dir.glob("recbole-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {RECBOLE_REQUIREMENT} produced no wheel in {tmp_dir}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in (INTER_FILE, ITEM_FILE):
                data = wheel.read(_WHEEL_MEMBER.format(name=name))
                _check_file_digest(name, data, f"{wheels[0].name}!{_WHEEL_MEMBER.format(name=name)}")
                (tmp_dir / name).write_bytes(data)
        for name in (INTER_FILE, ITEM_FILE):
            os.replace(tmp_dir / name, target / name)


def _read_cache(cache_dir: Path) -> MovieLens:
    folder = cache_dir / "ml-100k"
    if not all((folder / name).exists() for name in (INTER_FILE, ITEM_FILE)):
        _download_into(folder)
    blobs = {}
    for name in (INTER_FILE, ITEM_FILE):
        blobs[name] = (folder / name).read_bytes()
        _check_file_digest(name, blobs[name], folder / name)
    return MovieLens(
        interactions=_parse_recbole_inter(blobs[INTER_FILE]),
        items=_parse_recbole_item(blobs[ITEM_FILE]),
        source=folder / INTER_FILE,
    )


def _read_source(source: Path) -> MovieLens:
    """Read a user-supplied copy; only the formats GroupLens and RecBole publish are accepted."""
    source = source.expanduser().resolve()
    if source.is_dir():
        for candidate in (source / INTER_FILE, source / "u.data", source / "ml-100k" / "u.data"):
            if candidate.exists():
                return _read_source(candidate)
        raise FileNotFoundError(f"{source} holds neither {INTER_FILE} nor u.data")
    if not source.exists():
        raise FileNotFoundError(f"MovieLens source not found: {source}")

    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as archive:
            names = {Path(n).name: n for n in archive.namelist()}
            missing = [n for n in ("u.data", "u.item") if n not in names]
            if missing:
                raise FileNotFoundError(f"{source} lacks {', '.join(missing)}: not GroupLens' ml-100k.zip")
            interactions = _parse_upstream_data(archive.read(names["u.data"]))
            items = _parse_upstream_item(archive.read(names["u.item"]))
    elif source.name == INTER_FILE or source.suffix == ".inter":
        data = source.read_bytes()
        if source.name == INTER_FILE:
            _check_file_digest(INTER_FILE, data, source)
        interactions = _parse_recbole_inter(data)
        item_path = source.with_name(ITEM_FILE)
        if not item_path.exists():
            raise FileNotFoundError(f"{item_path} not found next to {source}")
        item_data = item_path.read_bytes()
        _check_file_digest(ITEM_FILE, item_data, item_path)
        items = _parse_recbole_item(item_data)
    else:  # u.data and anything named like it
        interactions = _parse_upstream_data(source.read_bytes())
        item_path = source.with_name("u.item")
        if not item_path.exists():
            raise FileNotFoundError(f"{item_path} not found next to {source}")
        items = _parse_upstream_item(item_path.read_bytes())

    if len(items) != N_ITEMS or set(items["item_id"]) != set(range(1, N_ITEMS + 1)):
        raise ValueError(f"items next to {source}: expected ids 1..{N_ITEMS}, got {len(items)} rows")
    return MovieLens(interactions=interactions, items=items, source=source)


def load_movielens_100k(cache_dir: Path | None = None, source: Path | None = None) -> MovieLens:
    """Load ML-100K from `source` if given, else from `cache_dir` (downloading once).

    `cache_dir` defaults to `PathSettings().cache_dir` (~/.cache/echotune); the data lands in
    its `ml-100k/` folder. Raises ChecksumError (a ValueError) naming the file and both digests
    when the data is not exactly MovieLens 100K.
    """
    if source is not None:
        movielens = _read_source(Path(source))
    else:
        # PathSettings expands `~` only for values it is given, not for its own default.
        folder = Path(cache_dir) if cache_dir is not None else PathSettings().cache_dir
        movielens = _read_cache(folder.expanduser().resolve())
    _check_ratings(movielens.interactions, movielens.source)
    logger.debug(
        "MovieLens 100K: %d ratings, %d items from %s",
        len(movielens.interactions),
        len(movielens.items),
        movielens.source,
    )
    return movielens
