"""Who sees which variant: deterministic hashing, layers, and a refreshing cache for replicas.

A user's layer bucket is hash("layer:<layer>", user) mod 1000; the running experiment owning
that bucket (at most one per layer) then hashes (salt, user) into 10,000 variant buckets split
by the variants' weights. Hashes are blake2b, so every replica and every language agrees, and
the two hashes are independent, so the users of one experiment are a random sample of the
layer whichever experiment ran before.

    cache = AssignmentCache(registry.snapshot, refresh_interval_s=2.0)
    for a in cache.assign("user-42"): ...   # a.experiment, a.variant, a.params
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from app.experiments.definitions import LAYER_BUCKETS, Experiment, override_dict
from app.experiments.registry import kill_field

log = logging.getLogger(__name__)

VARIANT_BUCKETS = 10_000


def bucket(salt: str, user_id: str, buckets: int) -> int:
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def variant_for(experiment: Experiment, user_id: str) -> str:
    """The variant of a user in an experiment they are in, by weight."""
    b = bucket(experiment.hash_salt, user_id, VARIANT_BUCKETS)
    total = sum(v.weight for v in experiment.variants)
    edge = 0.0
    for v in experiment.variants:
        edge += v.weight / total * VARIANT_BUCKETS
        if b < edge:
            return v.name
    return experiment.variants[-1].name


@dataclass(frozen=True)
class Assignment:
    experiment: str
    variant: str
    params: dict[str, Any] = field(default_factory=dict)


def assign(experiments: list[Experiment], killed: set[str], user_id: str) -> list[Assignment]:
    """At most one assignment per layer; a killed variant's users get no assignment (the
    defaults) and are not exposed, so the rollback also stops their data counting."""
    out = []
    by_layer: dict[str, list[Experiment]] = {}
    for e in experiments:
        if e.status == "running" and e.buckets:
            by_layer.setdefault(e.layer, []).append(e)
    for layer, members in sorted(by_layer.items()):
        b = bucket(f"layer:{layer}", user_id, LAYER_BUCKETS)
        for e in members:
            lo, hi = e.buckets
            if lo <= b < hi:
                name = variant_for(e, user_id)
                if kill_field(e.name, name) not in killed:
                    out.append(Assignment(e.name, name, override_dict(e.variant(name).params)))
                break
    return out


def merged_params(assignments: list[Assignment]) -> dict[str, Any]:
    """One overrides dict for the serving path. Layers should not override the same key; if
    they do, the first layer (by name) wins and it is logged."""
    params: dict[str, Any] = {}
    for a in assignments:
        clash = set(params) & set(a.params)
        if clash:
            log.warning("experiments in different layers both set %s; %s does not apply them", sorted(clash), a.experiment)
        params.update({k: v for k, v in a.params.items() if k not in params})
    return params


class AssignmentCache:
    """Running experiments and kill switches as of at most `refresh_interval_s` ago.

    When the snapshot cannot be read the cache fails closed (no assignments): a replica that
    cannot see the kill switch must not keep serving a variant that may have been killed.
    `refresh` then raises, so that a BackgroundRefresh counts the failure; the inline check
    of `assign` does not, since a request must not fail for it.
    """

    def __init__(self, load: Callable[[], tuple[list[Experiment], set[str]]], refresh_interval_s: float, clock=time.monotonic):
        self.load = load
        self.refresh_interval_s = refresh_interval_s
        self.clock = clock
        self.snapshot: tuple[list[Experiment], set[str]] = ([], set())
        """(running experiments, killed variants), replaced in one assignment: a reader on
        another thread never pairs new definitions with old kill switches."""
        self._loaded_at = -float("inf")

    def refresh_if_stale(self) -> None:
        if self.clock() - self._loaded_at >= self.refresh_interval_s:
            self._load()  # a failure is logged and fails closed; the request goes on with defaults

    def refresh(self) -> None:
        """Re-reads the definitions now: a replica calls this from a BackgroundRefresh
        (app/refresh.py) and builds the cache with `refresh_interval_s=inf`. Raises what the
        read raised, after failing closed."""
        error = self._load()
        if error is not None:
            raise error

    def _load(self) -> Exception | None:
        self._loaded_at = self.clock()
        try:
            self.snapshot = self.load()
        except Exception as exc:  # noqa: BLE001 - any failure to read means: assign nobody
            log.warning("cannot read experiment definitions, assigning nobody: %s", exc)
            self.snapshot = ([], set())
            return exc
        return None

    def assign(self, user_id: str) -> list[Assignment]:
        self.refresh_if_stale()
        return assign(*self.snapshot, user_id)
