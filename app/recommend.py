"""The recommendation steps as plain functions; the Serve deployments are thin shells around
them. Inputs are the user's online features and the in-memory model bundle.

    fetch (FeatureFetcher) -> blend_candidates (Blender) -> rerank_candidates (Reranker)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.config import ServingSettings
from app.models import ModelBundle
from app.ranking.blend import blend_scores
from app.ranking.rerank import mmr_rerank
from app.ranking.retrieval import cf_candidates, content_candidates
from app.schemas import RecommendedTrack


@dataclass
class UserFeatures:
    user_id: str
    known: bool
    cf_vector: np.ndarray | None = None
    recent_tracks: list[str] = field(default_factory=list)
    seen_tracks: list[str] = field(default_factory=list)
    trending: list[tuple[str, float]] = field(default_factory=list)
    popular: list[tuple[str, float]] = field(default_factory=list)
    feature_version: str | None = None


@dataclass
class Blended:
    user_id: str
    cold_start: bool
    track_ids: list[str]
    scores: np.ndarray
    sources: list[list[str]]
    versions: dict[str, str]


def _ranked_list(bundle: ModelBundle, ranked: list[tuple[str, float]], exclude: set[int]):
    idx = [(bundle.index[t], s) for t, s in ranked if t in bundle.index and bundle.index[t] not in exclude]
    if not idx:
        return np.empty(0, dtype=np.int64), np.empty(0)
    items, scores = zip(*idx)
    return np.asarray(items, dtype=np.int64), np.asarray(scores)


def blend_candidates(features: UserFeatures, bundle: ModelBundle | None, settings: ServingSettings) -> Blended:
    """Retrieve from every source, then blend. A user the models do not know is a cold start:
    only the popular and trending sources can speak for them."""
    versions = {"features": features.feature_version} if features.feature_version else {}
    if bundle is None:
        # Nothing published yet: popularity straight from the feature store.
        ids = [t for t, _ in features.popular]
        return Blended(features.user_id, True, ids, np.asarray([s for _, s in features.popular]), [["popular"]] * len(ids), versions)

    seen = bundle.indices(features.seen_tracks)
    exclude = set(seen.tolist())
    n = settings.candidates
    sources: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    cold = features.cf_vector is None and not features.recent_tracks
    if features.cf_vector is not None and bundle.item_factors is not None:
        sources["cf"] = cf_candidates(features.cf_vector, bundle.item_factors, n, seen)
    recent = bundle.indices(features.recent_tracks)
    if len(recent):
        sources["content"] = content_candidates(recent, bundle.embeddings, n, seen)
    sources["trending"] = _ranked_list(bundle, features.trending, exclude)
    sources["popular"] = _ranked_list(bundle, features.popular, exclude)
    items, scores, reasons = blend_scores(sources, settings.source_weights)
    items, scores = items[:n], scores[:n]
    return Blended(
        user_id=features.user_id,
        cold_start=cold,
        track_ids=bundle.track_ids[items].tolist(),
        scores=scores,
        sources=[reasons[i] for i in items.tolist()],
        versions={**bundle.versions, **versions},
    )


def rerank_candidates(blended: Blended, bundle: ModelBundle | None, k: int, settings: ServingSettings) -> list[RecommendedTrack]:
    if bundle is None or not blended.track_ids:
        return [
            RecommendedTrack(track_id=t, score=float(s), sources=src)
            for t, s, src in zip(blended.track_ids[:k], blended.scores[:k], blended.sources[:k])
        ]
    idx = bundle.indices(blended.track_ids)
    order = mmr_rerank(
        blended.scores,
        bundle.embeddings[idx],
        k,
        settings.mmr_lambda,
        artists=bundle.artists[idx],
        artist_cap=settings.artist_cap,
    )
    return [
        RecommendedTrack(
            track_id=blended.track_ids[p],
            score=float(blended.scores[p]),
            sources=blended.sources[p],
            artist_id=bundle.artists[idx[p]],
            genre=bundle.genres[idx[p]],
        )
        for p in order.tolist()
    ]


def user_features_from_row(
    user_id: str, row: dict | None, trending, popular, namespace: str | None
) -> UserFeatures:
    if row is None:
        return UserFeatures(user_id, False, trending=trending, popular=popular, feature_version=namespace)
    return UserFeatures(
        user_id=user_id,
        known=True,
        cf_vector=row.get("cf_vector"),
        recent_tracks=row.get("recent_tracks", []),
        seen_tracks=row.get("seen_tracks", []),
        trending=trending,
        popular=popular,
        feature_version=namespace,
    )
