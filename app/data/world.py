"""The simulated music world: catalogue, audio, listeners and their listening history.

No public music listening log is reachable from here (see shared/DATA.md), so EchoTune makes
its own, with a ground truth that real logs never have: every user's genre taste, every
track's tempo and key, and the exact moment a handful of tracks broke out. Collaborative
filtering, content embeddings and trending detection can therefore be checked against what
the world was built to contain, not just against each other.

Everything is a pure function of `WorldSettings`: the same settings give byte-identical
Parquet files and WAV clips (as long as the output folder is the same: `audio_path` holds
absolute paths). Each part of the world draws from its own random stream, so turning audio
off or changing the session rate leaves the catalogue untouched.

    from app.config import WorldSettings
    paths = generate_world(WorldSettings(), Path("~/.echotune/world").expanduser())
    world = load_world(paths.root)
    world.events.groupby("event_type").size()

The default world (400 users, 800 tracks, 14 days) takes a few seconds including audio.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from app.config import WorldSettings
from app.data.audio import choose_tempo_and_key, genre_sound, key_name, synthesize_clip, write_clip

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bumped whenever the same settings would generate a different world."""

EVENT_TYPES = ("play", "skip", "like", "dislike")
DEVICES = ("mobile", "desktop", "tablet", "tv")
ACTIVITY_LEVELS = ("light", "casual", "heavy")

# Share of users whose taste is deliberately concentrated on one genre (top weight >= 0.85):
# an end-to-end test needs listeners whose right answer is obvious.
FOCUSED_SHARE = 0.2
FOCUSED_WEIGHT = (0.85, 0.95)
# Share of the catalogue released during the history window ("new releases").
NEW_RELEASE_SHARE = 0.04
SECONDARY_GENRE_PROB = 0.3
SAME_ARTIST_PROB = 0.2
FAVOURITE_ARTISTS = 3
# Extra pull of a user's favourite artists: gives CF per-user structure beyond genre+popularity.
FAVOURITE_BOOST = 4.0
# Sessions of one user are separated by at least this much silence, longer than the usual
# 30-minute sessionisation gap, so a sessioniser recovers exactly the generated session ids.
SESSION_GAP_MS = 45 * 60_000
BREAKOUT_WINDOW_H = (20.0, 8.0)  # breakouts happen between 20 h and 8 h before the end
# Share of its genre's plays a breakout track takes once boosted (see _choose_breakouts).
BREAKOUT_SHARE = 0.35

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
_TS = pa.timestamp("ms", tz="UTC")

_ACTIVITY_SHARE = np.array([0.35, 0.45, 0.2])
_ACTIVITY_SESSIONS = np.array([0.4, 1.0, 2.2])
_DEVICE_SHARE = np.array([0.6, 0.25, 0.1, 0.05])
# (locale, country, UTC offset in hours, share of users)
_LOCALES = (
    ("en-US", "US", -5.0, 0.30),
    ("en-GB", "GB", 0.0, 0.10),
    ("de-DE", "DE", 1.0, 0.10),
    ("fr-FR", "FR", 1.0, 0.07),
    ("es-ES", "ES", 1.0, 0.05),
    ("es-MX", "MX", -6.0, 0.07),
    ("pt-BR", "BR", -3.0, 0.10),
    ("ja-JP", "JP", 9.0, 0.08),
    ("sv-SE", "SE", 1.0, 0.05),
    ("en-IN", "IN", 5.5, 0.08),
)
# Relative chance a session starts in each local hour: quiet nights, a commute bump, an
# evening peak.
_DIURNAL = np.array(
    [0.5, 0.3, 0.2, 0.15, 0.15, 0.25, 0.6, 1.2, 1.6, 1.2, 1.0, 1.0,
     1.2, 1.1, 1.0, 1.1, 1.3, 1.6, 2.0, 2.2, 2.2, 1.9, 1.4, 0.9]
)


@dataclass(frozen=True)
class _GenreMeta:
    duration_s: float
    explicit_prob: float
    first_year: int
    neighbours: tuple[str, ...]


_GENRE_META = {
    "rock": _GenreMeta(240, 0.10, 1965, ("metal", "folk", "pop")),
    "pop": _GenreMeta(205, 0.15, 1960, ("electronic", "hiphop", "rock")),
    "jazz": _GenreMeta(330, 0.0, 1950, ("classical", "hiphop", "folk")),
    "electronic": _GenreMeta(300, 0.05, 1985, ("pop", "hiphop")),
    "hiphop": _GenreMeta(220, 0.55, 1985, ("pop", "electronic", "jazz")),
    "classical": _GenreMeta(420, 0.0, 1950, ("jazz", "folk")),
    "folk": _GenreMeta(230, 0.02, 1960, ("rock", "pop", "classical")),
    "metal": _GenreMeta(300, 0.30, 1975, ("rock",)),
}
_DEFAULT_META = _GenreMeta(240, 0.10, 1970, ())

_ADJECTIVES = (
    "Velvet", "Electric", "Silent", "Golden", "Neon", "Broken", "Midnight", "Crimson", "Hollow",
    "Wild", "Paper", "Silver", "Northern", "Lonely", "Burning", "Frozen", "Distant", "Secret",
    "Crystal", "Sweet", "Iron", "Blue", "Wandering", "Quiet", "Amber", "Restless", "Hidden",
)
_NOUNS = (
    "Fox", "River", "Engine", "Harbor", "Echo", "Lantern", "Wolf", "Satellite", "Garden",
    "Machine", "Sparrow", "Mountain", "Tide", "Shadow", "Ghost", "Bridge", "Kite", "Comet",
    "Orchard", "Signal", "Highway", "Window", "Ocean", "Letter", "Storm", "Mirror", "Horizon",
)
_FIRST = ("Ada", "Ben", "Clara", "Dev", "Elin", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kaia",
          "Luca", "Mira", "Nico", "Olga", "Pablo", "Rosa", "Sami", "Tove", "Yara")
_LAST = ("Park", "Silva", "Novak", "Berg", "Okafor", "Moreau", "Tanaka", "Rossi", "Lind", "Weber",
         "Costa", "Haas", "Ibsen", "Kowal", "Mendes", "Sato", "Vance", "Duarte", "Falk", "Grant")
_PLACES = ("the City", "the Dark", "Summer", "the Valley", "Tokyo", "the Rain", "Blue Light", "the Sea")


@dataclass(frozen=True)
class WorldPaths:
    """Files of one generated world. All paths are absolute."""

    root: Path
    tracks: Path
    artists: Path
    users: Path
    events: Path
    breakouts: Path
    audio_dir: Path
    manifest: Path
    """`world.json`: the settings the world was generated from, so readers need no guessing."""

    @classmethod
    def under(cls, out_dir: Path) -> WorldPaths:
        root = Path(out_dir).expanduser().resolve()
        return cls(
            root=root,
            tracks=root / "tracks.parquet",
            artists=root / "artists.parquet",
            users=root / "users.parquet",
            events=root / "events.parquet",
            breakouts=root / "breakouts.parquet",
            audio_dir=root / "audio",
            manifest=root / "world.json",
        )


@dataclass(frozen=True)
class World:
    """A generated world loaded into pandas, for tests, notebooks and the demo."""

    settings: WorldSettings
    paths: WorldPaths
    artists: pd.DataFrame
    tracks: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame
    breakouts: pd.DataFrame


ARTISTS_SCHEMA = pa.schema(
    [("artist_id", pa.string()), ("name", pa.string()), ("genre", pa.string()), ("popularity", pa.float64())]
)
TRACKS_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("title", pa.string()),
        ("artist_id", pa.string()),
        ("artist_name", pa.string()),
        ("album", pa.string()),
        ("genres", pa.list_(pa.string())),
        ("genre", pa.string()),
        ("release_year", pa.int64()),
        ("release_date", _TS),
        ("duration_ms", pa.int64()),
        ("explicit", pa.bool_()),
        ("category", pa.string()),
        ("tempo_bpm", pa.float64()),
        ("key", pa.string()),
        ("audio_path", pa.string()),
    ]
)
USERS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("top_genre", pa.string()),
        ("taste", pa.list_(pa.float64())),
        ("locale", pa.string()),
        ("country", pa.string()),
        ("device", pa.string()),
        ("activity", pa.string()),
    ]
)
EVENTS_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("track_id", pa.string()),
        ("event_type", pa.string()),
        ("timestamp", _TS),
        ("session_id", pa.string()),
        ("duration_ms", pa.int64()),
        ("device", pa.string()),
        ("locale", pa.string()),
    ]
)
BREAKOUTS_SCHEMA = pa.schema([("track_id", pa.string()), ("breakout_at", _TS)])

# One random stream per part of the world: changing how one part draws never shifts another.
_STREAM_CATALOGUE, _STREAM_USERS, _STREAM_EVENTS, _STREAM_IDS, _STREAM_AUDIO = range(5)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, *stream])


def _ids(prefix: str, count: int, width: int) -> list[str]:
    width = max(width, len(str(count)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, count + 1)]


def _ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(round(value.timestamp() * 1000))


@dataclass
class _Catalogue:
    genres: list[str]
    artist_ids: list[str]
    artist_names: list[str]
    artist_genre: np.ndarray  # genre index per artist
    artist_pop: np.ndarray
    track_ids: list[str]
    titles: list[str]
    albums: list[str]
    track_artist: np.ndarray
    track_genre: np.ndarray  # primary genre index
    track_genre2: np.ndarray  # secondary genre index, -1 if none
    weight: np.ndarray  # artist popularity x track popularity (Zipf-like)
    release_ms: np.ndarray
    duration_ms: np.ndarray
    explicit: np.ndarray
    tempo: np.ndarray
    keys: list[str]
    breakout_ms: np.ndarray  # int64 max for tracks that never break out
    breakout_tracks: np.ndarray  # indices, in breakout order


@dataclass
class _Users:
    ids: list[str]
    taste: np.ndarray  # (n_users, n_genres)
    locale_idx: np.ndarray
    device_idx: np.ndarray
    activity_idx: np.ndarray
    favourites: list[np.ndarray]  # favourite artist indices per user


def _meta(genre: str) -> _GenreMeta:
    return _GENRE_META.get(genre, _DEFAULT_META)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0) + 1
        seen[name] = count
        out.append(name if count == 1 else f"{name} {count}")
    return out


def _artist_name(genre: str, rng: np.random.Generator) -> str:
    adj, noun = _ADJECTIVES[rng.integers(len(_ADJECTIVES))], _NOUNS[rng.integers(len(_NOUNS))]
    first, last = _FIRST[rng.integers(len(_FIRST))], _LAST[rng.integers(len(_LAST))]
    if genre == "electronic":
        return f"DJ {adj} {noun}"
    if genre == "hiphop":
        return f"MC {first} {noun}"
    if genre == "jazz":
        return f"{first} {last} {('Trio', 'Quartet', 'Quintet')[rng.integers(3)]}"
    if genre == "classical":
        return f"{last} {('Ensemble', 'Chamber Orchestra', 'String Quartet')[rng.integers(3)]}"
    if genre in ("rock", "metal"):
        return f"The {adj} {noun}s"
    return f"{first} {last}"


def _title(rng: np.random.Generator) -> str:
    adj, noun = _ADJECTIVES[rng.integers(len(_ADJECTIVES))], _NOUNS[rng.integers(len(_NOUNS))]
    if rng.random() < 0.3:
        return f"{noun} in {_PLACES[rng.integers(len(_PLACES))]}"
    return f"{adj} {noun}"


def _within_group_rank(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1-based random rank of each element inside its group (vectorised)."""
    order = np.lexsort((rng.random(len(groups)), groups))
    sorted_groups = groups[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    first_of_group = np.repeat(starts, np.diff(np.r_[starts, len(groups)]))
    rank = np.empty(len(groups), dtype=np.int64)
    rank[order] = np.arange(len(groups)) - first_of_group + 1
    return rank


def _make_catalogue(settings: WorldSettings) -> _Catalogue:
    rng = _rng(settings.seed, _STREAM_CATALOGUE)
    genres = list(settings.genres)
    n_genres, n_artists, n_tracks = len(genres), settings.n_artists, settings.n_tracks
    end_ms = _ms(settings.end)
    start_ms = end_ms - settings.days * _DAY_MS

    # Round-robin before shuffling: every genre gets an artist whenever there are enough.
    artist_genre = rng.permutation(np.arange(n_artists) % n_genres)
    artist_pop = (rng.permutation(n_artists) + 1.0) ** -0.8
    artist_names = _unique([_artist_name(genres[g], rng) for g in artist_genre])

    # Every artist gets a track first; the rest lean towards popular artists.
    extra = max(n_tracks - n_artists, 0)
    p = np.sqrt(artist_pop) / np.sqrt(artist_pop).sum()
    track_artist = np.sort(np.r_[np.arange(min(n_artists, n_tracks)), rng.choice(n_artists, extra, p=p)])
    track_genre = artist_genre[track_artist]
    weight = artist_pop[track_artist] * _within_group_rank(track_artist, rng) ** -1.0

    genre2 = np.full(n_tracks, -1, dtype=np.int64)
    for i in np.flatnonzero(rng.random(n_tracks) < SECONDARY_GENRE_PROB):
        primary = genres[track_genre[i]]
        options = [genres.index(g) for g in _meta(primary).neighbours if g in genres]
        if not options:
            options = [j for j in range(n_genres) if j != track_genre[i]]
        genre2[i] = options[rng.integers(len(options))]

    meta = [_meta(g) for g in genres]
    mean_s = np.array([m.duration_s for m in meta])[track_genre]
    duration_ms = (np.clip(mean_s * rng.lognormal(0.0, 0.25, n_tracks), 90, 900) * 1000).astype(np.int64)
    explicit = rng.random(n_tracks) < np.array([m.explicit_prob for m in meta])[track_genre]
    titles = _unique([_title(rng) for _ in range(n_tracks)])

    # The first breakout is also a new release: a brand-new track that takes off. The other
    # new releases are random, but never one of the back-catalogue breakouts.
    n_breakouts = min(settings.n_breakouts, n_tracks)
    breakout_tracks = _choose_breakouts(rng, n_breakouts, track_genre, weight, settings.breakout_boost)
    n_new = min(n_tracks, max(int(round(NEW_RELEASE_SHARE * n_tracks)), 1 if n_breakouts else 0))
    is_new = np.zeros(n_tracks, dtype=bool)
    is_new[breakout_tracks[:1]] = True
    others = np.setdiff1d(np.arange(n_tracks), breakout_tracks)
    is_new[rng.choice(others, min(len(others), n_new - int(is_new.sum())), replace=False)] = True
    n_new = int(is_new.sum())

    # Back catalogue: albums of up to ten tracks per artist, released years before the window,
    # more of them recent. New releases are singles dropped during the window.
    release_ms = np.zeros(n_tracks, dtype=np.int64)
    albums = [""] * n_tracks
    end_year = settings.end.year
    for artist in range(n_artists):
        own = np.flatnonzero((track_artist == artist) & ~is_new)
        first_year = meta[artist_genre[artist]].first_year
        for chunk in np.array_split(own, max(1, int(np.ceil(len(own) / 10)))):
            if not len(chunk):
                continue
            year = int(np.clip(end_year - 1 - np.floor(rng.exponential(12.0)), first_year, end_year - 1))
            day = datetime(year, 1, 1, tzinfo=timezone.utc)
            album_ms = min(_ms(day) + int(rng.integers(0, 365)) * _DAY_MS, start_ms - 30 * _DAY_MS)
            name = f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} {_NOUNS[rng.integers(len(_NOUNS))]}s"
            release_ms[chunk] = album_ms
            for i in chunk:
                albums[i] = name
    new_idx = np.flatnonzero(is_new)
    latest_release = max(start_ms, end_ms - 6 * _HOUR_MS)
    release_ms[new_idx] = rng.integers(start_ms, latest_release, size=n_new, endpoint=True)
    for i in new_idx:
        albums[i] = f"{titles[i]} - Single"

    breakout_ms = np.full(n_tracks, np.iinfo(np.int64).max, dtype=np.int64)
    if n_breakouts:
        earliest, latest = (end_ms - int(h * _HOUR_MS) for h in BREAKOUT_WINDOW_H)
        at = rng.integers(max(earliest, start_ms), latest, size=n_breakouts, endpoint=True)
        breakout_ms[breakout_tracks] = at
        # The first breakout is brand new: released a few hours before it takes off.
        fresh = breakout_tracks[0]
        release_ms[fresh] = max(start_ms, at[0] - int(rng.uniform(2, 30) * _HOUR_MS))

    tempo = np.zeros(n_tracks)
    keys = []
    for i in range(n_tracks):
        sound = genre_sound(genres[track_genre[i]])
        bpm, tonic, mode = choose_tempo_and_key(sound, _rng(settings.seed, _STREAM_AUDIO, i))
        tempo[i] = bpm
        keys.append(key_name(tonic, mode))

    return _Catalogue(
        genres=genres,
        artist_ids=_ids("a", n_artists, 4),
        artist_names=artist_names,
        artist_genre=artist_genre,
        artist_pop=artist_pop,
        track_ids=_ids("t", n_tracks, 5),
        titles=titles,
        albums=albums,
        track_artist=track_artist,
        track_genre=track_genre,
        track_genre2=genre2,
        weight=weight,
        release_ms=release_ms,
        duration_ms=duration_ms,
        explicit=explicit,
        tempo=tempo,
        keys=keys,
        breakout_ms=breakout_ms,
        breakout_tracks=breakout_tracks,
    )


def _choose_breakouts(
    rng: np.random.Generator, count: int, track_genre: np.ndarray, weight: np.ndarray, boost: float
) -> np.ndarray:
    """Tracks in different genres whose boosted share of their genre's plays will be about
    BREAKOUT_SHARE. Sized by share rather than by rank so the effect is as visible in a 60-track
    test world as in the default one: a boosted hit would look like its usual self, and a
    boosted obscure track would still be too quiet to trend."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    # Boosted share S = B*s / (1 - s + B*s)  =>  s = S / (B - (B - 1) * S).
    target = BREAKOUT_SHARE / (boost - (boost - 1.0) * BREAKOUT_SHARE)
    genre_total = np.bincount(track_genre, weights=weight)
    distance = np.abs(np.log(weight / genre_total[track_genre] / target))
    taken = np.zeros(len(weight), dtype=bool)
    chosen: list[int] = []
    genre_order = rng.permutation(np.unique(track_genre))
    for attempt in range(count * len(genre_order)):
        if len(chosen) == count:
            break
        members = np.flatnonzero(~taken & (track_genre == genre_order[attempt % len(genre_order)]))
        if len(members):
            closest = members[np.argsort(distance[members], kind="stable")[:3]]
            pick = int(rng.choice(closest))
            chosen.append(pick)
            taken[pick] = True
    return np.array(chosen, dtype=np.int64)


def _make_users(settings: WorldSettings, cat: _Catalogue) -> _Users:
    rng = _rng(settings.seed, _STREAM_USERS)
    n_users, n_genres = settings.n_users, len(cat.genres)
    stocked = np.unique(cat.track_genre)  # genres that actually have tracks

    n_focused = max(1, int(round(FOCUSED_SHARE * n_users)))
    focused = np.zeros(n_users, dtype=bool)
    focused[rng.permutation(n_users)[:n_focused]] = True

    taste = np.zeros((n_users, n_genres))
    for u in range(n_users):
        if focused[u]:
            g = int(rng.choice(stocked))
            top = rng.uniform(*FOCUSED_WEIGHT)
            rest = rng.dirichlet(np.ones(n_genres - 1)) * (1.0 - top)
            taste[u] = np.insert(rest, g, top)
        else:
            favs = rng.choice(stocked, min(len(stocked), int(rng.integers(1, 3))), replace=False)
            alpha = np.full(n_genres, 0.2)
            alpha[favs] += 3.0
            taste[u] = rng.dirichlet(alpha)

    locale_idx = rng.choice(len(_LOCALES), n_users, p=np.array([loc[3] for loc in _LOCALES]))
    device_idx = rng.choice(len(DEVICES), n_users, p=_DEVICE_SHARE)
    activity_idx = rng.choice(len(ACTIVITY_LEVELS), n_users, p=_ACTIVITY_SHARE)

    favourites = []
    for u in range(n_users):
        top2 = np.argsort(-taste[u], kind="stable")[:2]
        pool = np.flatnonzero(np.isin(cat.artist_genre, top2))
        if len(pool) == 0:
            favourites.append(np.zeros(0, dtype=np.int64))
            continue
        p = cat.artist_pop[pool] / cat.artist_pop[pool].sum()
        favourites.append(rng.choice(pool, min(FAVOURITE_ARTISTS, len(pool)), replace=False, p=p))

    return _Users(
        ids=_ids("u", n_users, 4),
        taste=taste,
        locale_idx=locale_idx,
        device_idx=device_idx,
        activity_idx=activity_idx,
        favourites=favourites,
    )


class _TrackPicker:
    """Draws tracks the way the world's listeners choose them at a given moment: only released
    tracks, breakout tracks boosted after their breakout time."""

    def __init__(self, cat: _Catalogue, boost: float) -> None:
        self.cat = cat
        self.boost = boost
        self.genre_pools = [np.flatnonzero(cat.track_genre == g) for g in range(len(cat.genres))]
        self.artist_pools = [np.flatnonzero(cat.track_artist == a) for a in range(len(cat.artist_ids))]

    def pick(self, pool: np.ndarray, weights: np.ndarray, t_ms: int, u: float) -> int:
        """Inverse-CDF draw from `pool` at time `t_ms`; -1 if nothing there is released yet."""
        w = np.where(self.cat.release_ms[pool] <= t_ms, weights, 0.0)
        w = np.where(self.cat.breakout_ms[pool] <= t_ms, w * self.boost, w)
        cdf = np.cumsum(w)
        if cdf[-1] <= 0:
            return -1
        return int(pool[min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(pool) - 1)])


def _simulate_events(settings: WorldSettings, cat: _Catalogue, users: _Users) -> pa.Table:
    rng = _rng(settings.seed, _STREAM_EVENTS)
    end_ms = _ms(settings.end)
    start_ms = end_ms - settings.days * _DAY_MS
    window_ms = end_ms - start_ms
    midnight0 = start_ms - start_ms % _DAY_MS
    picker = _TrackPicker(cat, settings.breakout_boost)
    diurnal = _DIURNAL / _DIURNAL.sum()
    session_scale = settings.sessions_per_user / float(_ACTIVITY_SHARE @ _ACTIVITY_SESSIONS)
    stocked = np.array([len(pool) > 0 for pool in picker.genre_pools])

    ts: list[int] = []
    user_col: list[int] = []
    track_col: list[int] = []
    type_col: list[int] = []
    session_col: list[str] = []
    dur_col: list[int] = []
    device_col: list[int] = []

    for u, user_id in enumerate(users.ids):
        taste = np.where(stocked, users.taste[u], 0.0)
        taste_cdf = list(np.cumsum(taste / taste.sum()))
        affinity = users.taste[u] / users.taste[u].max()
        fav_mult = np.where(np.isin(cat.track_artist, users.favourites[u]), FAVOURITE_BOOST, 1.0)
        pool_weights = [cat.weight[pool] * fav_mult[pool] for pool in picker.genre_pools]
        offset_ms = int(_LOCALES[users.locale_idx[u]][2] * _HOUR_MS)

        n_sessions = int(rng.poisson(session_scale * _ACTIVITY_SESSIONS[users.activity_idx[u]]))
        days = rng.integers(0, settings.days, n_sessions)
        hours = rng.choice(24, n_sessions, p=diurnal)
        local_ms = days * _DAY_MS + hours * _HOUR_MS + (rng.random(n_sessions) * _HOUR_MS).astype(np.int64)
        starts = np.sort((midnight0 + local_ms - offset_ms - start_ms) % window_ms + start_ms)

        prev_end = np.iinfo(np.int64).min // 2
        for k, planned in enumerate(starts):
            t = max(int(planned), prev_end + SESSION_GAP_MS)
            if t >= end_ms:
                break
            session_id = f"{user_id}-s{k + 1:03d}"
            device = int(users.device_idx[u]) if rng.random() < 0.85 else int(rng.integers(len(DEVICES)))
            prev_track = -1
            for _ in range(max(1, int(rng.poisson(settings.tracks_per_session)))):
                if t >= end_ms:
                    break
                track = -1
                if prev_track >= 0 and rng.random() < SAME_ARTIST_PROB:
                    pool = picker.artist_pools[cat.track_artist[prev_track]]
                    pool = pool[pool != prev_track]
                    if len(pool):
                        track = picker.pick(pool, cat.weight[pool], t, rng.random())
                for _attempt in range(4):
                    if track >= 0:
                        break
                    g = min(bisect_right(taste_cdf, rng.random()), len(taste_cdf) - 1)
                    track = picker.pick(picker.genre_pools[g], pool_weights[g], t, rng.random())
                if track < 0:
                    break  # nothing released yet in the genres this user likes

                g1, g2 = cat.track_genre[track], cat.track_genre2[track]
                closeness = min(1.0, affinity[g1] + (0.3 * affinity[g2] if g2 >= 0 else 0.0))
                skipped = rng.random() < 0.08 + 0.6 * (1.0 - closeness)
                full = int(cat.duration_ms[track])
                if skipped:
                    listened = min(full, int(rng.integers(3_000, 30_000)))
                elif rng.random() < 0.7:
                    listened = full
                else:
                    listened = int(full * rng.uniform(0.5, 1.0))
                ts.append(t)
                user_col.append(u)
                track_col.append(track)
                type_col.append(1 if skipped else 0)
                session_col.append(session_id)
                dur_col.append(listened)
                device_col.append(device)
                if not skipped:
                    r = rng.random()
                    p_like = 0.03 + 0.25 * closeness**2
                    p_dislike = 0.005 + 0.05 * (1.0 - closeness)
                    reaction = 2 if r < p_like else 3 if r < p_like + p_dislike else -1
                    at = t + max(1, int(listened * rng.uniform(0.3, 1.0)))
                    if reaction >= 0 and at < end_ms:
                        ts.append(at)
                        user_col.append(u)
                        track_col.append(track)
                        type_col.append(reaction)
                        session_col.append(session_id)
                        dur_col.append(0)
                        device_col.append(device)
                prev_track = track
                t += listened + int(rng.integers(500, 15_000))
            prev_end = t

    ts_arr = np.array(ts, dtype=np.int64)
    order = np.lexsort((np.arange(len(ts_arr)), ts_arr))  # generation order breaks ties
    ids_rng = _rng(settings.seed, _STREAM_IDS)
    raw = ids_rng.bytes(16 * len(order))
    event_ids = [str(uuid.UUID(bytes=raw[16 * i : 16 * i + 16], version=4)) for i in range(len(order))]
    user_arr, track_arr = np.array(user_col, dtype=np.int64)[order], np.array(track_col, dtype=np.int64)[order]
    locales = [loc[0] for loc in _LOCALES]
    return pa.table(
        {
            "event_id": event_ids,
            "user_id": [users.ids[i] for i in user_arr],
            "track_id": [cat.track_ids[i] for i in track_arr],
            "event_type": [EVENT_TYPES[i] for i in np.array(type_col, dtype=np.int64)[order]],
            "timestamp": pa.array(ts_arr[order], type=pa.int64()).cast(_TS),
            "session_id": [session_col[i] for i in order],
            "duration_ms": np.array(dur_col, dtype=np.int64)[order],
            "device": [DEVICES[i] for i in np.array(device_col, dtype=np.int64)[order]],
            "locale": [locales[users.locale_idx[i]] for i in user_arr],
        },
        schema=EVENTS_SCHEMA,
    )


def _render_audio(settings: WorldSettings, cat: _Catalogue, audio_dir: Path) -> list[str]:
    """Write one clip per track and drop clips of tracks no longer in the catalogue, so a
    regenerated world never carries audio from an older one."""
    audio_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, track_id in enumerate(cat.track_ids):
        sound = genre_sound(cat.genres[cat.track_genre[i]])
        rng = _rng(settings.seed, _STREAM_AUDIO, i)
        tempo, tonic, mode = choose_tempo_and_key(sound, rng)  # same draws as the catalogue's
        clip = synthesize_clip(
            sound, tempo, tonic, mode, seconds=settings.clip_seconds, sample_rate=settings.sample_rate, rng=rng
        )
        path = audio_dir / f"{track_id}.wav"
        write_clip(path, clip, settings.sample_rate)
        paths.append(str(path))
    keep = set(cat.track_ids)
    for stale in audio_dir.glob("t*.wav"):
        if stale.stem not in keep:
            stale.unlink()
    return paths


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write beside the target, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def generate_world(settings: WorldSettings, out_dir: Path, *, audio: bool = True) -> WorldPaths:
    """Generate the whole world under `out_dir` (created if needed). Existing files are
    replaced one atomic rename at a time, so a reader of an older world never sees a torn file,
    and regenerating with the same settings rewrites the same bytes."""
    started = time.perf_counter()
    paths = WorldPaths.under(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)

    cat = _make_catalogue(settings)
    users = _make_users(settings, cat)
    logger.info(
        "world catalogue: %d artists, %d tracks, %d users", len(cat.artist_ids), len(cat.track_ids), len(users.ids)
    )
    events = _simulate_events(settings, cat, users)
    logger.info("world events: %d in %.1f s", events.num_rows, time.perf_counter() - started)
    audio_paths: list[str | None] = [None] * len(cat.track_ids)
    if audio:
        audio_paths = list(_render_audio(settings, cat, paths.audio_dir))
        logger.info("world audio: %d clips in %.1f s", len(audio_paths), time.perf_counter() - started)

    artist_ids = np.array(cat.artist_ids, dtype=object)
    artist_names = np.array(cat.artist_names, dtype=object)
    genres = np.array(cat.genres, dtype=object)
    release_years = [datetime.fromtimestamp(ms / 1000, tz=timezone.utc).year for ms in cat.release_ms]
    track_genres = [
        [cat.genres[g1]] + ([cat.genres[g2]] if g2 >= 0 else []) for g1, g2 in zip(cat.track_genre, cat.track_genre2)
    ]
    tracks = pa.table(
        {
            "track_id": cat.track_ids,
            "title": cat.titles,
            "artist_id": artist_ids[cat.track_artist].tolist(),
            "artist_name": artist_names[cat.track_artist].tolist(),
            "album": cat.albums,
            "genres": track_genres,
            "genre": genres[cat.track_genre].tolist(),
            "release_year": release_years,
            "release_date": pa.array(cat.release_ms, type=pa.int64()).cast(_TS),
            "duration_ms": cat.duration_ms,
            "explicit": cat.explicit,
            "category": ["music"] * len(cat.track_ids),
            "tempo_bpm": cat.tempo,
            "key": cat.keys,
            "audio_path": audio_paths,
        },
        schema=TRACKS_SCHEMA,
    )
    artists = pa.table(
        {
            "artist_id": cat.artist_ids,
            "name": cat.artist_names,
            "genre": genres[cat.artist_genre].tolist(),
            "popularity": cat.artist_pop,
        },
        schema=ARTISTS_SCHEMA,
    )
    users_table = pa.table(
        {
            "user_id": users.ids,
            "top_genre": genres[np.argmax(users.taste, axis=1)].tolist(),
            "taste": users.taste.tolist(),
            "locale": [_LOCALES[i][0] for i in users.locale_idx],
            "country": [_LOCALES[i][1] for i in users.locale_idx],
            "device": [DEVICES[i] for i in users.device_idx],
            "activity": [ACTIVITY_LEVELS[i] for i in users.activity_idx],
        },
        schema=USERS_SCHEMA,
    )
    breakouts = pa.table(
        {
            "track_id": [cat.track_ids[i] for i in cat.breakout_tracks],
            "breakout_at": pa.array(cat.breakout_ms[cat.breakout_tracks], type=pa.int64()).cast(_TS),
        },
        schema=BREAKOUTS_SCHEMA,
    )

    for table, path in (
        (artists, paths.artists),
        (tracks, paths.tracks),
        (users_table, paths.users),
        (events, paths.events),
        (breakouts, paths.breakouts),
    ):
        _write_parquet(table, path)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "settings": settings.model_dump(mode="json"),
        "audio": audio,
        "rows": {"artists": artists.num_rows, "tracks": tracks.num_rows, "users": users_table.num_rows,
                 "events": events.num_rows, "breakouts": breakouts.num_rows},
    }
    paths.manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("world written to %s in %.1f s", paths.root, time.perf_counter() - started)
    return paths


def load_world(out_dir: Path) -> World:
    """Read a world written by `generate_world` into pandas DataFrames."""
    paths = WorldPaths.under(out_dir)
    if not paths.manifest.exists():
        raise FileNotFoundError(
            f"no generated world in {paths.root} (missing {paths.manifest.name}); run generate_world first"
        )
    manifest = json.loads(paths.manifest.read_text())
    if manifest.get("generator_version") != GENERATOR_VERSION:
        raise ValueError(
            f"{paths.manifest}: world generated by version {manifest.get('generator_version')}, "
            f"this code reads version {GENERATOR_VERSION}; regenerate it"
        )
    return World(
        settings=WorldSettings.model_validate(manifest["settings"]),
        paths=paths,
        artists=pq.read_table(paths.artists).to_pandas(),
        tracks=pq.read_table(paths.tracks).to_pandas(),
        users=pq.read_table(paths.users).to_pandas(),
        events=pq.read_table(paths.events).to_pandas(),
        breakouts=pq.read_table(paths.breakouts).to_pandas(),
    )
