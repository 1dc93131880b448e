"""Track catalogues for the content job: the column contract, and loaders for real audio.

The content job reads one Parquet catalogue: `track_id`, `audio_path` (a local path, `file://`
or any URI pyarrow opens, such as `s3://`), `artist_id`, `album`, `genres`, `release_year`,
`duration_ms`, `explicit`. `normalise_catalog` maps common spellings onto it (`audio_uri`,
`artist`, `year`, `duration_s`, a single `genre`) and separates rows that cannot be a track at
all (no id, a repeated id) so the job can dead-letter them with their reason.

Real audio, fetched at run time into a cache folder and never committed (see DATA.md):

- `immich_music_catalog(cache_dir)`: 28 machine-generated clips of about 33 s (Opus, MIT) from
  the `immich-memories-music==0.1.0` wheel, with each clip's prompted tempo, key and mood from
  its LICENSE-MUSIC: the ground truth for tempo/key accuracy and mood neighbourhoods.
- `debian_music_catalog(package, cache_dir)`: a human-made game soundtrack from Debian
  (`warzone2100-music`, GPL-2+/CC-BY-SA, or `singularity-music`), by `apt-get download` and
  `dpkg-deb -x`; apt verifies the package against the archive's signed index.

    catalog = immich_music_catalog(settings.paths.cache_dir)
    write_catalog(catalog, Path("/tmp/immich.parquet"))
    # python -m app.data.audio_catalog immich --out /tmp/immich.parquet
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from app.artifacts import sha256_file

logger = logging.getLogger(__name__)

CATALOG_COLUMNS = ["track_id", "audio_path", "artist_id", "album", "genres", "release_year", "duration_ms", "explicit"]
"""What the content job reads; other columns (title, ground truth) are carried along."""

_ALIASES = {
    "audio_path": ("audio_uri", "uri", "path"),
    "artist_id": ("artist", "artist_name"),
    "release_year": ("year",),
}

IMMICH_REQUIREMENT = "immich-memories-music==0.1.0"
IMMICH_WHEEL_SHA256 = "1b702f617250ed8ffe3dc2bba4d2105f842b6d5da08e8ff9a10110f54b7bd06a"
_ENHARMONIC = {"Db": "C#", "Eb": "D#", "Gb": "F#", "Ab": "G#", "Bb": "A#"}


def normalise_catalog(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tracks with the CATALOG_COLUMNS, rejected rows with `track_id`, `reason`).

    Missing optional columns become nulls (the features have fixed stand-ins for them); a
    missing `track_id` or audio column is a ValueError naming it, because then no row is usable.
    """
    df = raw.copy()
    for column, aliases in _ALIASES.items():
        if column not in df:
            for alias in aliases:
                if alias in df:
                    df[column] = df[alias]
                    break
    if "genres" not in df:
        df["genres"] = df["genre"].map(lambda g: [] if g is None or g != g else [g]) if "genre" in df else None
    if "duration_ms" not in df:
        if "duration_s" in df:
            df["duration_ms"] = pd.to_numeric(df["duration_s"], errors="coerce") * 1000.0
        else:
            df["duration_ms"] = np.nan
    for column in ("track_id", "audio_path"):
        if column not in df:
            raise ValueError(f"catalog has no `{column}` column (columns: {sorted(raw.columns)})")
    for column in ("artist_id", "album", "release_year", "explicit"):
        if column not in df:
            df[column] = None
    # Serving reads a main `genre` and a `release_date`; derive them when a catalogue has neither.
    if "genre" not in df:
        df["genre"] = df["genres"].map(lambda g: str(g[0]) if g is not None and np.ndim(g) > 0 and len(g) else None)
    if "release_date" not in df:
        year = pd.to_numeric(df["release_year"], errors="coerce")
        df["release_date"] = pd.to_datetime(year.astype("Int64").astype(str) + "-01-01", errors="coerce", utc=True)
    duration = pd.to_numeric(df["duration_ms"], errors="coerce")
    df["duration_ms"] = duration.where(duration >= 0)  # a negative duration is unknown, not fatal

    ids = df["track_id"]
    no_id = ids.isna() | (ids.astype(str).str.strip() == "")
    repeated = ~no_id & ids.duplicated(keep="first")
    rejected = pd.concat(
        [
            pd.DataFrame({"track_id": ids[no_id].astype(object), "reason": "no_track_id"}),
            pd.DataFrame({"track_id": ids[repeated].astype(str), "reason": "duplicate_track_id"}),
        ],
        ignore_index=True,
    )
    tracks = df[~no_id & ~repeated].reset_index(drop=True)
    tracks["track_id"] = tracks["track_id"].astype(str)
    extra = [c for c in tracks.columns if c not in CATALOG_COLUMNS]
    return tracks[CATALOG_COLUMNS + extra], rejected


def write_catalog(catalog: pd.DataFrame, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    catalog.to_parquet(path, index=False)
    return path


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(command)}): {result.stderr.strip()[-500:]}")


def fetch_immich_music(cache_dir: Path, wheel: Path | None = None) -> Path:
    """Folder holding `immich_memories_music/tracks/<mood>/*.opus` and LICENSE-MUSIC.

    Downloads the wheel with pip (or takes a local `wheel`), checks its sha256 and extracts it
    once; a verified extraction is reused. A half-finished download never becomes the cache.
    """
    target = Path(cache_dir) / "immich-memories-music-0.1.0"
    if (target / ".verified").exists():
        return target
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        if wheel is None:
            logger.info("downloading %s via pip", IMMICH_REQUIREMENT)
            _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "--quiet", IMMICH_REQUIREMENT, "-d", tmp],
                "pip download",
            )
            wheel = next(Path(tmp).glob("immich_memories_music-*.whl"))
        digest = sha256_file(Path(wheel))
        if digest != IMMICH_WHEEL_SHA256:
            raise ValueError(f"{wheel}: sha256 {digest} is not the expected {IMMICH_WHEEL_SHA256}")
        staging = Path(tmp) / "extract"
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(staging)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)
    (target / ".verified").write_text(IMMICH_WHEEL_SHA256)
    return target


_LICENSE_ROW = re.compile(
    r"^\s*(?P<file>\S+\.opus)\s+(?P<bpm>\d+(?:\.\d+)?)\s*bpm\s+(?P<tonic>[A-G][b#]?)\s+(?P<mode>major|minor)"
    r"\s+seed\s+(?P<seed>\d+)\s+\[(?P<tag>[^\]]+)\]",
    re.MULTILINE,
)


def parse_immich_license(text: str) -> pd.DataFrame:
    """LICENSE-MUSIC's table: file, tempo_bpm, key (sharps, e.g. 'Bb minor' -> 'A# minor'), seed, tag."""
    rows = []
    for m in _LICENSE_ROW.finditer(text):
        tonic = _ENHARMONIC.get(m["tonic"], m["tonic"])
        rows.append(
            {"file": m["file"], "tempo_bpm": float(m["bpm"]), "key": f"{tonic} {m['mode']}", "seed": int(m["seed"]), "tag": m["tag"]}
        )
    if not rows:
        raise ValueError("LICENSE-MUSIC has no track table")
    return pd.DataFrame(rows)


def immich_music_catalog(cache_dir: Path, wheel: Path | None = None) -> pd.DataFrame:
    """The 28 labelled clips as a catalogue, with `mood`, `tempo_bpm` and `key` ground truth.

    The mood is deliberately not a genre here: it is what the embedding should recover, so it
    must not be an input. `genres` holds the acoustic/electronic tag instead.
    """
    root = fetch_immich_music(cache_dir, wheel)
    license_path = next(root.glob("*.dist-info/licenses/LICENSE-MUSIC"))
    labels = parse_immich_license(license_path.read_text())
    files = {p.name: p for p in (root / "immich_memories_music" / "tracks").glob("*/*.opus")}
    missing = sorted(set(labels["file"]) - set(files))
    if missing:
        raise ValueError(f"clips listed in LICENSE-MUSIC but not in the wheel: {missing}")
    labels["audio_path"] = labels["file"].map(lambda f: str(files[f]))
    labels["mood"] = labels["file"].map(lambda f: files[f].parent.name)
    return pd.DataFrame(
        {
            "track_id": "immich:" + labels["file"].str.removesuffix(".opus"),
            "audio_path": labels["audio_path"],
            "title": labels["file"].str.removesuffix(".opus"),
            "artist_id": "ACE-Step",
            "album": "immich-memories-music 0.1.0",
            "genres": labels["tag"].map(lambda t: [t]),
            "release_year": 2025,
            "duration_ms": np.nan,
            "explicit": False,
            "mood": labels["mood"],
            "tempo_bpm": labels["tempo_bpm"],
            "key": labels["key"],
        }
    )


DEBIAN_MUSIC = {"warzone2100-music": "usr/share/games/warzone2100/music", "singularity-music": "usr/share/games/singularity/music"}


def fetch_debian_package(package: str, cache_dir: Path) -> Path:
    """Extract a Debian package (without installing it) into the cache; reused once verified."""
    if package not in DEBIAN_MUSIC:
        raise ValueError(f"unknown music package {package!r}; known: {sorted(DEBIAN_MUSIC)}")
    target = Path(cache_dir) / "debian" / package
    if (target / ".verified").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("downloading %s with apt-get download", package)
        result = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()[-500:]}")
        deb = next(Path(tmp).glob(f"{package}_*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], "dpkg-deb -x")
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(Path(tmp) / "x"), target)
        (target / ".verified").write_text(f"{deb.name} sha256 {sha256_file(deb)}\n")
    return target


def debian_music_catalog(package: str, cache_dir: Path) -> pd.DataFrame:
    """Every audio file of the package; Warzone's album.json files give title, artist, album, year."""
    root = fetch_debian_package(package, cache_dir) / DEBIAN_MUSIC[package]
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in {".ogg", ".opus"}):
        rows.append({"path": path, "title": path.stem, "artist_id": package, "album": path.parent.name, "release_year": None})
    albums = {}
    for album_json in root.rglob("album.json"):
        album = json.loads(album_json.read_text())
        for track in album.get("tracks", []):
            albums[album_json.parent / track["filename"]] = (album, track)
    for row in rows:
        if row["path"] in albums:
            album, track = albums[row["path"]]
            year = str(album.get("date", ""))[:4]
            row.update(
                title=track.get("title", row["title"]),
                artist_id=track.get("author") or album.get("author") or package,
                album=album.get("title", row["album"]),
                release_year=int(year) if year.isdigit() else None,
            )
    catalog = pd.DataFrame(rows)
    rel = catalog["path"].map(lambda p: p.relative_to(root).with_suffix("").as_posix())
    return pd.DataFrame(
        {
            "track_id": f"{package}:" + rel,
            "audio_path": catalog["path"].map(str),
            "title": catalog["title"],
            "artist_id": catalog["artist_id"],
            "album": catalog["album"],
            "genres": [["soundtrack"]] * len(catalog),
            "release_year": pd.array(catalog["release_year"], dtype="Int64"),
            "duration_ms": np.nan,
            "explicit": False,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a real-audio catalogue Parquet for jobs.embed_content.")
    parser.add_argument("source", choices=["immich", *DEBIAN_MUSIC])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/echotune").expanduser())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    catalog = (
        immich_music_catalog(args.cache_dir) if args.source == "immich" else debian_music_catalog(args.source, args.cache_dir)
    )
    print(f"{len(catalog)} tracks -> {write_catalog(catalog, args.out)}")


if __name__ == "__main__":
    main()
