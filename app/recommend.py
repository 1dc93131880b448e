"""The recommendation steps as plain functions; the Serve deployments are thin shells around
them. Inputs are the user's online features and the in-memory model bundle.

    FeatureFetcher ──▶ CF retrieval ─┐
                   └─▶ content       ├─▶ blend_candidates (+ trending, new releases,
                                     │   popular, segment weights, recency, filters)
                                     └─▶ rerank_candidates (MMR, artist cap, genre balance,
                                         fallback fill)

Retrieval functions take a batch of requests, so a deployment using `@serve.batch` turns many
users into one matrix product.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from app.config import ServingSettings
from app.models import ModelBundle
from app.prefs import UserPrefs
from app.ranking.blend import Reasons, blend_ranked
from app.ranking.filters import allowed
from app.ranking.recency import MS_PER_DAY
from app.ranking.rerank import mmr_rerank
from app.ranking.retrieval import top_k
from app.ranking.segments import user_segment
from app.schemas import RecommendedTrack
from app.wire import array, buffer, id_list, ids

log = logging.getLogger(__name__)

RECENCY_REASON_MIN = 0.5
"""A recency boost at least this large (of its maximum) is reported as a reason."""


@dataclass
class UserFeatures:
    user_id: str
    known: bool
    cf_vector: np.ndarray | None = None
    recent_tracks: list[str] = field(default_factory=list)
    seen_tracks: list[str] = field(default_factory=list)
    heard_recently: list[str] = field(default_factory=list)
    online_recent: list[str] = field(default_factory=list)
    """Plays the event consumer has seen, newest first, possibly newer than the last training."""
    n_plays: int = 0
    prefs: UserPrefs = field(default_factory=UserPrefs)
    trending: list[tuple[str, float]] = field(default_factory=list)
    popular: list[tuple[str, float]] = field(default_factory=list)
    feature_version: str | None = None
    cf_version: str | None = None
    """The CF model version `cf_vector` came from: vectors of another version live in a
    different latent space and must not be scored against the current item factors."""
    stale: bool = False
    """Features came from the replica's local snapshot because the online store was down."""
    seen_weights: np.ndarray | None = None
    """The weight CF training gave each of `seen_tracks` (cf.event_weights summed: 0 for a track
    only skipped or disliked), so a fold-in solves what training solved. None (features
    materialised before this field): every seen track weighs 1."""

    def __reduce_ex__(self, protocol: int):
        """Features go to three stages per request: ids as one string each, the vectors as
        buffers (app/wire.py)."""
        p = self.prefs
        return _user_features, (
            self.user_id, self.known, *buffer(self.cf_vector, protocol),
            ids(self.recent_tracks), ids(self.seen_tracks), ids(self.heard_recently), ids(self.online_recent), self.n_plays,
            p.allow_explicit, ids(p.blocked_tracks), ids(p.blocked_artists),
            self.trending, self.popular, self.feature_version, self.cf_version, self.stale, *buffer(self.seen_weights, protocol),
        )

    @property
    def fresh_plays(self) -> list[str]:
        """Plays not yet reflected in the materialised history: they drive the fold-in."""
        seen = set(self.seen_tracks)
        return [t for t in self.online_recent if t not in seen]

    @property
    def exclude(self) -> set[str]:
        return set(self.heard_recently) | set(self.online_recent)


def _user_features(
    user_id, known, vector, vector_dtype, recent, seen, heard, online, n_plays,
    allow_explicit, blocked_tracks, blocked_artists, trending, popular, feature_version, cf_version, stale,
    seen_weights, seen_weights_dtype,
) -> UserFeatures:
    return UserFeatures(
        user_id, known, array(vector, vector_dtype), id_list(recent), id_list(seen), id_list(heard), id_list(online), n_plays,
        UserPrefs(allow_explicit, set(id_list(blocked_tracks)), set(id_list(blocked_artists))),
        trending, popular, feature_version, cf_version, stale, array(seen_weights, seen_weights_dtype),
    )


@dataclass
class Retrieved:
    """One source's candidates for one user: by index into the catalog `catalog` (the content
    version) when they came from a model bundle, and by track id.

    On the wire (pickled between stages) candidates with catalog positions leave their ids
    behind: the receiving replica holds the catalog, and 500 ids were 16 of a source's 20 KB
    per request (numpy stores them as UTF-32), pickled by the retriever, relayed by the
    ingress, unpickled by the Blender. After a model reload in between, `placed_in` names
    them again from the replica's previous bundle. Lists from elsewhere (Redis) keep their ids,
    and so do candidates `named` by a retriever that loaded its catalog a moment ago: the
    Blender may not hold that catalog yet, and without the ids it could only drop them."""

    track_ids: Sequence[str] | None
    scores: np.ndarray
    indices: np.ndarray | None = None
    catalog: str | None = None
    named: bool = False

    def __reduce_ex__(self, protocol: int):
        ids = None if self.indices is not None and self.catalog is not None and not self.named else self.track_ids
        return _retrieved, (
            *buffer(ids, protocol), *buffer(self.scores, protocol), *buffer(self.indices, protocol), self.catalog, self.named,
        )


def _retrieved(ids, ids_dtype, scores, scores_dtype, indices, indices_dtype, catalog, named) -> Retrieved:
    return Retrieved(array(ids, ids_dtype), array(scores, scores_dtype), array(indices, indices_dtype), catalog, named)


@dataclass
class Blended:
    user_id: str
    cold_start: bool
    track_ids: Sequence[str]
    """As in Retrieved."""
    scores: np.ndarray
    reasons: Reasons
    versions: dict[str, str]
    segment: str = "new"
    degraded: bool = False
    indices: np.ndarray | None = None
    """Positions in the catalog `catalog` (see Retrieved), when the blend had a model bundle."""
    catalog: str | None = None

    def __reduce_ex__(self, protocol: int):
        """Its arrays as buffers (app/wire.py); every field, in order."""
        return _blended, (
            self.user_id, self.cold_start, *buffer(self.track_ids, protocol), *buffer(self.scores, protocol),
            self.reasons.names, *buffer(self.reasons.masks, protocol), self.versions, self.segment, self.degraded,
            *buffer(self.indices, protocol), self.catalog,
        )


def _blended(user_id, cold_start, ids, ids_dtype, scores, scores_dtype, names, masks, masks_dtype, versions, segment,
             degraded, indices, indices_dtype, catalog) -> Blended:
    return Blended(
        user_id, cold_start, array(ids, ids_dtype), array(scores, scores_dtype), Reasons(names, array(masks, masks_dtype)),
        versions, segment, degraded, array(indices, indices_dtype), catalog,
    )


def _exclude_idx(bundle: ModelBundle, features: UserFeatures) -> np.ndarray:
    return bundle.indices(features.exclude)


def _per_request(n: int | Sequence[int], size: int) -> list[int]:
    return [n] * size if isinstance(n, int) else list(n)


def retrieve_cf(
    batch: list[tuple[UserFeatures, np.ndarray | None]], bundle: ModelBundle | None, n: int | Sequence[int]
) -> list[Retrieved]:
    """CF top-n for a batch of users: one (users x factors) @ (factors x items) product.

    Each entry carries the user's vector to use (the trained one, or a fresh fold-in computed
    by the caller); users without one get no CF candidates. `n` is one for all, or one per
    request (an experiment variant may change it).
    """
    n = _per_request(n, len(batch))
    out = [Retrieved([], np.empty(0)) for _ in batch]
    if bundle is None or bundle.item_factors is None:
        return out
    rows = [i for i, (_, vec) in enumerate(batch) if vec is not None]
    if not rows:
        return out
    users = np.stack([np.asarray(batch[i][1], dtype=np.float32) for i in rows])
    scores = users @ bundle.item_factors.T
    for row, i in enumerate(rows):
        idx, s = top_k(scores[row], n[i], _exclude_idx(bundle, batch[i][0]))
        out[i] = Retrieved(bundle.track_ids[idx], s, idx, bundle.versions.get("content"))
    return out


def retrieve_content(batch: list[UserFeatures], bundle: ModelBundle | None, n: int | Sequence[int]) -> list[Retrieved]:
    """Nearest neighbours of each user's recent plays (centroid of unit-norm embeddings); `n`
    as in retrieve_cf."""
    n = _per_request(n, len(batch))
    out = [Retrieved([], np.empty(0)) for _ in batch]
    if bundle is None:
        return out
    centroids, rows = [], []
    for i, features in enumerate(batch):
        # A session in progress says more about what to play next than the longer history.
        fresh = features.fresh_plays[:5]
        recent = bundle.indices(fresh if fresh else features.recent_tracks)
        if len(recent):
            c = bundle.embeddings[recent].mean(axis=0)
            norm = np.linalg.norm(c)
            if norm > 0:
                centroids.append(c / norm)
                rows.append(i)
    if not rows:
        return out
    sims = np.stack(centroids) @ bundle.embeddings.T
    for row, i in enumerate(rows):
        idx, s = top_k(sims[row], n[i], _exclude_idx(bundle, batch[i]))
        out[i] = Retrieved(bundle.track_ids[idx], s, idx, bundle.versions.get("content"))
    return out


def new_releases(bundle: ModelBundle, now_ms: int, days: float, n: int) -> Retrieved:
    released_in_window = int(np.searchsorted(bundle.newest_first_neg_ms, -(now_ms - days * MS_PER_DAY), side="right"))
    order = bundle.newest_first[: min(n, released_in_window)]
    return Retrieved(bundle.track_ids[order], bundle.release_ms[order].astype(np.float64), order, bundle.versions.get("content"))


def shared_candidates(bundle: ModelBundle, trending: list[tuple[str, float]], popular: list[tuple[str, float]]) -> dict[str, Retrieved]:
    """The candidate lists every user shares (trending; popular, the bundle's own when the
    feature store had none), resolved to catalog positions. The Blender resolves them once per
    refresh and passes them to `blend_candidates` as `shared`, rather than every request
    looking up the same thousand track ids."""
    return {"trending": _in_catalog(bundle, trending), "popular": _in_catalog(bundle, popular or bundle.popular)}


def _in_catalog(bundle: ModelBundle, items: list[tuple[str, float]]) -> Retrieved:
    by_id = Retrieved([t for t, _ in items], np.asarray([s for _, s in items], dtype=np.float64))
    idx, scores = _as_indices(bundle, by_id)
    return Retrieved(bundle.track_ids[idx], scores, idx, bundle.versions.get("content"))


def placed_in(retrieved: Retrieved | None, bundle: ModelBundle | None, source: ModelBundle | None) -> Retrieved | None:
    """`retrieved` ready to blend over `bundle`: as it is when it holds that catalog's positions
    or its track ids; named from `source` (the bundle of its catalog, e.g. the replica's previous
    one) after a reload in between; no candidates when neither can name them."""
    if retrieved is None or bundle is None or retrieved.track_ids is not None or retrieved.catalog == bundle.versions.get("content"):
        return retrieved
    if source is not None and retrieved.catalog == source.versions.get("content"):
        return Retrieved(source.track_ids[retrieved.indices], retrieved.scores)
    log.warning("candidates from catalog %s dropped: neither it nor its ids are at hand", retrieved.catalog)
    return Retrieved([], np.empty(0))


def _as_indices(bundle: ModelBundle, retrieved: Retrieved) -> tuple[np.ndarray, np.ndarray]:
    if retrieved.indices is not None and retrieved.catalog == bundle.versions.get("content"):
        return retrieved.indices, np.asarray(retrieved.scores, dtype=np.float64)
    pairs = [(bundle.index[t], s) for t, s in zip(retrieved.track_ids, np.asarray(retrieved.scores).tolist()) if t in bundle.index]
    if not pairs:
        return np.empty(0, dtype=np.int64), np.empty(0)
    idx, scores = zip(*pairs)
    return np.asarray(idx, dtype=np.int64), np.asarray(scores, dtype=np.float64)


def blend_candidates(
    features: UserFeatures,
    bundle: ModelBundle | None,
    settings: ServingSettings,
    cf: Retrieved | None = None,
    content: Retrieved | None = None,
    now_ms: int | None = None,
    shared: dict[str, Retrieved] | None = None,
) -> Blended:
    """Blend every source with the user's segment weights, add the recency boost, apply the
    hard filters. A user the models know nothing about is a cold start: only trending, new
    releases and popular can speak for them. `shared` is `shared_candidates` of this bundle
    and the features' trending and popular lists, when the caller keeps it resolved."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    versions = {"features": features.feature_version} if features.feature_version else {}
    cold = _cold(features)
    segment = user_segment(features.n_plays, settings.casual_from_plays, settings.heavy_from_plays)
    if bundle is None:
        # Nothing published yet: popularity straight from the feature store (no catalogue to
        # know artists or explicit flags by, so only the track filters apply).
        drop = features.exclude | features.prefs.blocked_tracks
        items = [(t, s) for t, s in features.popular if t not in drop]
        return Blended(
            features.user_id, True, [t for t, _ in items], np.asarray([s for _, s in items]),
            Reasons.single("popular", len(items)), versions, segment, features.stale,
        )

    n = settings.candidates
    shared = shared or shared_candidates(bundle, features.trending, features.popular)
    sources = {
        "cf": cf or Retrieved([], np.empty(0)),
        "content": content or Retrieved([], np.empty(0)),
        "trending": shared["trending"],
        "new_releases": new_releases(bundle, now_ms, settings.new_release_days, n),
        "popular": shared["popular"],
    }
    # The excluded tracks as a mask over catalog positions: one lookup per candidate, not a
    # string lookup per candidate (nor np.isin's sort, 0.15 ms with cold caches).
    excluded = np.zeros(len(bundle.track_ids), dtype=bool)
    excluded[bundle.indices(features.exclude | features.prefs.blocked_tracks)] = True
    # Only a listener with blocked artists or without explicit content pays for gathering the
    # candidates' artists and flags (0.06 ms with cold caches); the others' blend stops at 2n.
    by_preference = bool(features.prefs.blocked_artists) or not features.prefs.allow_explicit
    items, scores, reasons = blend_ranked(
        {name: _as_indices(bundle, r) for name, r in sources.items()}, settings.weights_for(segment), len(bundle.track_ids),
        release_ms=bundle.release_ms, now_ms=now_ms, half_life_days=settings.recency_half_life_days,
        recency_weight=settings.recency_weight, recency_reason_min=RECENCY_REASON_MIN,
        excluded=excluded, limit=None if by_preference else 2 * n,
    )
    if by_preference:
        keep = np.flatnonzero(allowed(
            bundle.track_ids[items],
            bundle.artists[items],
            bundle.explicit[items],
            blocked_artists=features.prefs.blocked_artists,
            allow_explicit=features.prefs.allow_explicit,
        ))[: 2 * n]
        items, scores, reasons = items[keep], scores[keep], reasons[keep]
    return Blended(
        user_id=features.user_id,
        cold_start=cold,
        track_ids=bundle.track_ids[items],
        scores=scores,
        reasons=reasons,
        versions={**bundle.versions, **versions},
        segment=segment,
        degraded=features.stale,
        indices=items,
        catalog=bundle.versions.get("content"),
    )


def _cold(features: UserFeatures) -> bool:
    """Nothing the models could know the listener by: only history-free sources speak for them."""
    return features.cf_vector is None and not features.recent_tracks and not features.online_recent


def popular_fallback(features: UserFeatures, bundle: ModelBundle | None, settings: ServingSettings) -> Blended:
    """The replica's own popular list for a listener whose blend failed. The filters are applied
    here because this path skips the blend, where they otherwise are: a fallback must not bring
    back a blocked track or artist, an explicit one for a listener who opted out, or what they
    just heard."""
    segment = user_segment(features.n_plays, settings.casual_from_plays, settings.heavy_from_plays)
    if bundle is None:
        return Blended(features.user_id, _cold(features), [], np.empty(0), Reasons.single("popular", 0), {}, segment, degraded=True)
    items = [(bundle.index[t], s) for t, s in bundle.popular if t in bundle.index]
    idx = np.asarray([i for i, _ in items], dtype=np.int64)
    scores = np.asarray([s for _, s in items], dtype=np.float64)
    prefs = features.prefs
    keep = allowed(
        bundle.track_ids[idx], bundle.artists[idx], bundle.explicit[idx], always_exclude=features.exclude,
        blocked_tracks=prefs.blocked_tracks, blocked_artists=prefs.blocked_artists, allow_explicit=prefs.allow_explicit,
    )
    idx, scores = idx[keep], scores[keep]
    versions = {"trending": bundle.versions["trending"]} if "trending" in bundle.versions else {}
    return Blended(
        features.user_id, _cold(features), bundle.track_ids[idx], scores, Reasons.single("popular", len(idx)), versions,
        segment, degraded=True, indices=idx, catalog=bundle.versions.get("content"),
    )


def rerank_candidates(blended: Blended, bundle: ModelBundle | None, k: int, settings: ServingSettings) -> list[RecommendedTrack]:
    """MMR over the content embeddings with the artist cap and genre balance. If the caps leave
    the list short, it is filled from the remaining candidates in fallback-chain order."""
    if bundle is None or not len(blended.track_ids):
        return [
            RecommendedTrack(track_id=t, score=float(s), sources=r)
            for t, s, r in zip(blended.track_ids[:k], blended.scores[:k], blended.reasons[:k])
        ]
    if blended.indices is not None and blended.catalog == bundle.versions.get("content"):
        idx = blended.indices
    else:  # the blend saw another catalog (a reload in between): map by track id
        known = [p for p, t in enumerate(blended.track_ids) if t in bundle.index]
        blended = _subset(blended, known)
        idx = bundle.indices(blended.track_ids)
        if not len(idx):
            return []
    genre_cap = max(1, int(np.floor(settings.genre_max_share * k)))
    order = mmr_rerank(
        blended.scores, bundle.embeddings, k, settings.mmr_lambda,
        artists=bundle.artist_codes, artist_cap=settings.artist_cap,
        genres=bundle.genre_codes, genre_cap=genre_cap, rows=idx,
    ).tolist()
    if len(order) < k:
        order += _fill(blended, order, k - len(order), settings.fallback_chain)
    picked, out = np.asarray(order, dtype=np.int64), []
    columns = zip(
        order, np.asarray(blended.track_ids)[picked].tolist(), np.asarray(blended.scores)[picked].tolist(),
        blended.reasons[picked], bundle.artists[idx[picked]].tolist(), bundle.genres[idx[picked]].tolist(),
    )
    for position, (p, track_id, score, reasons, artist, genre) in enumerate(columns):
        if position > p:  # p is also its rank in the blend
            reasons.append("diversity_demoted")
        out.append(RecommendedTrack(track_id=track_id, score=score, sources=reasons, artist_id=artist, genre=genre))
    return out


def _subset(blended: Blended, positions: list[int]) -> Blended:
    return replace(
        blended, track_ids=[blended.track_ids[p] for p in positions], scores=np.asarray(blended.scores)[positions],
        reasons=blended.reasons[positions], indices=None,
    )


def _fill(blended: Blended, taken: list[int], need: int, chain: list[str]) -> list[int]:
    taken_set = set(taken)
    rest = [p for p in range(len(blended.track_ids)) if p not in taken_set]
    rank = {name: i for i, name in enumerate(chain)}
    rest.sort(key=lambda p: (min((rank.get(r, len(chain)) for r in blended.reasons[p]), default=len(chain)), p))
    return rest[:need]


def user_features_from_row(
    user_id: str,
    row: dict | None,
    trending,
    popular,
    namespace: str | None,
    stale: bool = False,
    online_recent: list[str] | None = None,
    prefs: UserPrefs | None = None,
    cf_version: str | None = None,
) -> UserFeatures:
    common = dict(
        trending=trending, popular=popular, feature_version=namespace, stale=stale, cf_version=cf_version,
        online_recent=online_recent or [], prefs=prefs or UserPrefs(),
    )
    if row is None:
        return UserFeatures(user_id, bool(online_recent), n_plays=len(online_recent or []), **common)
    return UserFeatures(
        user_id=user_id,
        known=True,
        cf_vector=row.get("cf_vector"),
        recent_tracks=row.get("recent_tracks", []),
        seen_tracks=row.get("seen_tracks", []),
        seen_weights=row.get("seen_weights"),
        heard_recently=row.get("heard_recently", row.get("seen_tracks", [])),
        n_plays=row.get("n_plays", 0),
        **common,
    )
