"""The serving-side view of the published models: one catalogue-aligned bundle in memory.

Serving needs, per catalogue track, its content embedding, its CF item factors and its
artist/genre. The jobs publish these as separate artifacts with their own id orders; the
bundle aligns them once at load time so every request is plain array indexing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from app.artifacts import ArtifactStore

log = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    track_ids: np.ndarray
    artists: np.ndarray
    genres: np.ndarray
    embeddings: np.ndarray
    item_factors: np.ndarray | None
    versions: dict[str, str]
    release_ms: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Release time per track (epoch ms, NaN when unknown): recency boost and new releases."""
    explicit: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    cf_params: dict = field(default_factory=dict)
    """The CF model's regularization and alpha: a fold-in must use what training used."""
    popular: list[tuple[str, float]] = field(default_factory=list)
    """Popular tracks from the trending artifact: the last-resort list when Redis is down."""
    index: dict[str, int] = field(default_factory=dict)
    artist_codes: np.ndarray = field(init=False)
    genre_codes: np.ndarray = field(init=False)
    """Artists and genres as integers (-1: unknown): the re-ranker's caps compare them."""
    newest_first: np.ndarray = field(init=False)
    """Positions of the tracks with a release time, newest first (ties in catalogue order), and
    minus their release times (ascending): a request finds the new releases by binary search
    instead of scanning the catalogue."""
    newest_first_neg_ms: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        # A numpy string array, not objects: a slice of it (a stage's candidates) pickles as
        # one buffer instead of one string object per candidate.
        self.track_ids = np.asarray(self.track_ids, dtype=str)
        self.index = {t: i for i, t in enumerate(self.track_ids.tolist())}
        self.artists, self.genres = _labels(self.artists), _labels(self.genres)
        self.artist_codes = pd.factorize(np.asarray(self.artists, dtype=object))[0]
        self.genre_codes = pd.factorize(np.asarray(self.genres, dtype=object))[0]
        n = len(self.track_ids)
        if len(self.release_ms) != n:
            self.release_ms = np.full(n, np.nan)
        if len(self.explicit) != n:
            self.explicit = np.zeros(n, dtype=bool)
        dated = np.flatnonzero(~np.isnan(self.release_ms))
        self.newest_first = dated[np.argsort(-self.release_ms[dated], kind="stable")]
        self.newest_first_neg_ms = -self.release_ms[self.newest_first]

    def indices(self, track_ids) -> np.ndarray:
        return np.fromiter((self.index[t] for t in track_ids if t in self.index), dtype=np.int64)

    @classmethod
    def load(cls, store: ArtifactStore) -> "ModelBundle | None":
        content = store.latest("content")
        if content is None:
            return None
        tracks = pd.read_parquet(content.file("tracks.parquet"))
        embeddings = np.load(content.file("embeddings.npy"))
        versions = {"content": content.version}
        item_factors = None
        cf_params: dict = {}
        cf = store.latest("cf")
        if cf is not None:
            cf_items = pd.read_parquet(cf.file("items.parquet"))["track_id"].to_numpy()
            factors = np.load(cf.file("item_factors.npy"))
            # Tracks the CF model never saw get a zero vector: no CF opinion, not a bad one.
            item_factors = np.zeros((len(tracks), factors.shape[1]), dtype=np.float32)
            pos = pd.Index(tracks["track_id"]).get_indexer(cf_items)
            item_factors[pos[pos >= 0]] = factors[pos >= 0]
            versions["cf"] = cf.version
            cf_params = {k: cf.manifest.get("params", {}).get(k) for k in ("regularization", "alpha")}
        popular: list[tuple[str, float]] = []
        trending = store.latest("trending")
        if trending is not None:
            versions["trending"] = trending.version
            top = pd.read_parquet(trending.file("popular.parquet")).head(500)
            popular = list(zip(top["track_id"].tolist(), top["score"].astype(float).tolist()))
        return cls(
            track_ids=tracks["track_id"].to_numpy(dtype=object),
            artists=tracks["artist_id"].to_numpy(dtype=object),
            genres=tracks["genre"].to_numpy(dtype=object),
            embeddings=embeddings.astype(np.float32),
            item_factors=item_factors,
            versions=versions,
            popular=popular,
            cf_params={k: v for k, v in cf_params.items() if v is not None},
            release_ms=_release_ms(tracks),
            explicit=tracks["explicit"].fillna(False).to_numpy(dtype=bool) if "explicit" in tracks else np.zeros(len(tracks), bool),
        )


def _labels(values) -> np.ndarray:
    """Artist or genre names as strings, None where unknown. A catalogue may leave them out:
    they then load as NaN (or as integers from an id column), and the answer's `artist_id` and
    `genre` are strings or null: one NaN in a batch's top k failed every answer of the batch."""
    return np.asarray([None if pd.isna(v) else str(v) for v in np.asarray(values, dtype=object).tolist()], dtype=object)


def release_ms(dates: pd.Series) -> pd.Series:
    """Epoch milliseconds of each date, a missing one left missing (nullable Int64). Computed as
    a duration, not read off the datetime's integer storage: that counts in whatever unit the
    catalogue happened to store (the world writes ms, normalise_catalog µs), and stores a
    missing date as the smallest int64. The bundle and the feature store (jobs/materialize.py)
    both use it, so serving and the store agree."""
    since_epoch = pd.to_datetime(dates, utc=True) - pd.Timestamp(0, tz="UTC")
    return (since_epoch // pd.Timedelta(milliseconds=1)).astype("Int64")


def _release_ms(tracks: pd.DataFrame) -> np.ndarray:
    if "release_date" not in tracks:
        return np.full(len(tracks), np.nan)
    return release_ms(tracks["release_date"]).astype("float64").to_numpy()


class ModelCache:
    """Holds the current bundle and reloads it when a job publishes a new version.

    Checking LATEST pointers is a few stat calls, done at most once per `interval_s` inside
    `get()`, so a replica picks up new models within seconds without a redeploy. A serving
    replica passes `interval_s=inf` and calls `refresh()` from a BackgroundRefresh
    (app/refresh.py): the reload then happens beside requests, not inside one.
    """

    def __init__(self, store: ArtifactStore, interval_s: float, clock=time.monotonic):
        self.store = store
        self.interval_s = interval_s
        self.clock = clock
        self.bundle: ModelBundle | None = None
        self.previous: ModelBundle | None = None
        """The bundle before the last reload: a request already under way may carry its
        catalog positions (app.recommend.placed_in)."""
        self._seen: tuple | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()

    def _pointers(self) -> tuple:
        return tuple(self.store.latest_version(n) for n in ("content", "cf", "trending"))

    def get(self) -> ModelBundle | None:
        if self.clock() - self._checked >= self.interval_s:
            self.refresh()
        return self.bundle

    def refresh(self) -> bool:
        """Loads the bundle if a job published since the last look; True when it did. The new
        bundle replaces the old in one assignment, so a reader sees one or the other."""
        with self._lock:
            self._checked = self.clock()
            pointers = self._pointers()
            if pointers == self._seen:
                return False
            bundle = ModelBundle.load(self.store)
            self.previous, self.bundle = self.bundle, bundle
            self._seen = pointers
        log.info("loaded models %s", bundle.versions if bundle else None)
        return True
