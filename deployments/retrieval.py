"""Candidate retrieval deployments, fanned out in parallel by the ingress.

Each call carries the ingress's batch of requests (deployments/pipeline.py): a batch of users
is one matrix product instead of many. Features come in and candidates go out packed
(deployments/packed.py).

The methods are `async` though they never await: their work is a few milliseconds of numpy
with no I/O, so it runs on the replica's event loop. A plain method is handed to a worker
thread per call; py-spy on a CFRetriever under load showed more samples in that hand-off
(anyio worker threads) than in the retrieval itself.
"""

from __future__ import annotations

import numpy as np
from ray import serve

from app.config import Settings
from app.models import ModelBundle
from app.recommend import Retrieved, UserFeatures, retrieve_cf, retrieve_content
from deployments.packed import Packed, pack, unpack
from deployments.tuning import ModelServing, candidates_for


def fold_in_vector(features: UserFeatures, bundle: ModelBundle, model, fresh_weight: float) -> np.ndarray | None:
    """The user's vector with plays since the last training folded in (exact ALS half-step
    over their whole known history, weighted as training weighed it, fresh plays weighted
    `fresh_weight`: they say what the listener wants now), so one new session changes the next
    recommendations."""
    fresh = [t for t in features.fresh_plays if t in bundle.index]
    current = features.cf_version is None or features.cf_version == bundle.versions.get("cf")
    if model is None:
        return features.cf_vector if current else None
    if not fresh and current:
        return features.cf_vector
    # New plays, or a stored vector from another model version: solve from the history.
    # A skipped or disliked track weighed 0 in training: it is no evidence of taste here either.
    seen, seen_weights = features.seen_tracks, features.seen_weights
    if seen_weights is None or len(seen_weights) != len(seen):
        seen_weights = np.ones(len(seen))
    history = [(t, w) for t, w in zip(seen, np.asarray(seen_weights, dtype=np.float64).tolist()) if w > 0 and t in bundle.index]
    if not history and not fresh:
        return None
    items = bundle.indices([t for t, _ in history] + fresh)
    weights = np.concatenate([np.asarray([w for _, w in history], dtype=np.float64), np.full(len(fresh), fresh_weight)])
    return model.fold_in(items, weights)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class CFRetriever(ModelServing):
    def __init__(self, settings: Settings):
        self._fold: tuple = (None, None)  # (bundle, its fold-in model)
        super().__init__(settings)

    def refresh(self) -> None:
        super().refresh()
        bundle = self.models.get()
        if bundle is not None:
            self._fold_in_model(bundle)  # built here, off the request path

    def _fold_in_model(self, bundle: ModelBundle):
        """The ALS model that folds plays into a user vector for this bundle; rebuilt only
        when the bundle changes (a new one replaces the pair in one assignment)."""
        from training.als import ImplicitALS

        if self._fold[0] is not bundle:
            model = None
            if bundle.item_factors is not None and bundle.cf_params:
                dummy_users = np.zeros((1, bundle.item_factors.shape[1]), dtype=np.float32)
                model = ImplicitALS.from_factors(dummy_users, bundle.item_factors, **bundle.cf_params)
            self._fold = (bundle, model)
        return self._fold[1]

    async def retrieve(self, packed: Packed[list[UserFeatures]], params: list[dict | None]) -> Packed[list[Retrieved]]:
        bundle, batch = self.models.get(), unpack(packed)
        if bundle is None:
            return pack([Retrieved([], np.empty(0)) for _ in batch])
        model = self._fold_in_model(bundle)
        pairs = [(f, fold_in_vector(f, bundle, model, self.serving.fresh_play_weight)) for f in batch]
        return pack(self.named(retrieve_cf(pairs, bundle, candidates_for(self.serving, params))))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class ContentRetriever(ModelServing):
    async def retrieve(self, packed: Packed[list[UserFeatures]], params: list[dict | None]) -> Packed[list[Retrieved]]:
        return pack(self.named(retrieve_content(unpack(packed), self.models.get(), candidates_for(self.serving, params))))
