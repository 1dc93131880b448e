"""Hot reconfiguration of ranking knobs through Serve's `user_config`.

`args.serving` in ray_config.yaml holds the defaults; a deployment's `user_config` (in the
same file, or `serve deploy` with a changed file) overrides any of those keys at run time:
Serve calls `reconfigure` on the live replicas, no restart, no dropped requests. An invalid
override is refused (the deploy fails and the replicas keep their current settings).
"""

from __future__ import annotations

import logging

from app.artifacts import ArtifactStore
from app.config import ServingSettings, Settings, variant_weights
from app.models import ModelCache
from app.recommend import Retrieved
from deployments.metrics import keep_fresh

log = logging.getLogger("ray.serve")


def apply_overrides(base: ServingSettings, overrides: dict | None) -> ServingSettings:
    """Validated copy of `base` with `overrides`; unknown keys and bad values raise."""
    if not overrides:
        return base
    return ServingSettings.model_validate({**base.model_dump(), **overrides})


def for_request(base: ServingSettings, params: dict | None) -> ServingSettings:
    """A request's settings: `base` with its experiment variant's and the flags' overrides,
    a variant's weights applying to every segment (app.config.variant_weights)."""
    return apply_overrides(base, variant_weights(base, params) if params else params)


def candidates_for(base: ServingSettings, params: list[dict | None]) -> list[int]:
    """Each request's candidates per source: an experiment variant may change how many (the
    Blender validates the whole override; only the key read here is validated here)."""
    return [
        base.candidates if not p or "candidates" not in p else apply_overrides(base, {"candidates": p["candidates"]}).candidates
        for p in params
    ]


class Tunable:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.serving = settings.serving

    def reconfigure(self, user_config: dict) -> None:
        self.serving = apply_overrides(self.settings.serving, user_config)
        log.info("%s reconfigured: %s", type(self).__name__, sorted(user_config or {}))


class ModelServing(Tunable):
    """A tunable deployment holding the model bundle, reloaded when a job publishes.

    The bundle is loaded before the replica reports ready and then looked for again every
    `reload_interval_s` on a background thread (app/refresh.py): a request never loads one.
    Subclasses extend `refresh()` with what they derive from the bundle."""

    NAMED_TICKS = 3
    """Refresh ticks after a load during which candidates carry their track ids (`named`)."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.models = ModelCache(ArtifactStore(settings.paths.artifacts_dir), interval_s=float("inf"))
        self._quiet_ticks = 0
        """Refreshes since the last one that loaded a bundle."""
        self.refresher = keep_fresh(self.refresh, settings.serving.reload_interval_s, type(self).__name__)

    def refresh(self) -> None:
        self._quiet_ticks = 0 if self.models.refresh() else self._quiet_ticks + 1

    def named(self, candidates: list[Retrieved]) -> list[Retrieved]:
        """`candidates`, sent with their track ids for NAMED_TICKS refreshes after this replica
        loaded its catalog: the next stage reloads on its own tick (the same interval, plus the
        load) and until then holds neither this catalog nor, as its previous one, any way to
        read positions in it."""
        if self._quiet_ticks < self.NAMED_TICKS:
            for c in candidates:
                c.named = True
        return candidates
