"""Experiment definitions and kill switches in Redis.

Definitions are one hash (name -> JSON). Starting an experiment claims a free range of its
layer's buckets under WATCH, so two operators starting experiments in one layer at once can
never give them overlapping users. Killed variants live in a second hash that is written
with one HSET: the rollback path needs nothing else to succeed.

    registry = ExperimentRegistry(client, Keys(prefix))
    registry.create(Experiment(...)); registry.start("mmr-test"); registry.kill("mmr-test", "low-lambda", "why")
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import redis
from pydantic import ValidationError

from app.experiments.definitions import LAYER_BUCKETS, Experiment, override_dict
from app.keys import Keys

log = logging.getLogger(__name__)


class ExperimentError(ValueError):
    """An operation the current state does not allow (unknown name, already running, no room)."""


def kill_field(experiment: str, variant: str) -> str:
    return f"{experiment}/{variant}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def free_range(taken: list[tuple[int, int]], width: int) -> tuple[int, int] | None:
    """First gap of `width` buckets between the ranges already taken in a layer."""
    start = 0
    for lo, hi in sorted(taken):
        if lo - start >= width:
            return start, start + width
        start = max(start, hi)
    return (start, start + width) if LAYER_BUCKETS - start >= width else None


def start_conflict(exp: Experiment, running: list[Experiment]) -> str | None:
    """Why `exp` must not start beside the running experiments, or None.

    - The same salt: the variant hash depends on the salt alone, so two experiments sharing
      one split their users identically, and across layers one's treatment group would be
      the other's; neither effect could be told apart.
    - An override key that a running experiment in another layer also sets: a user in both
      would get only one of them (assignment.merged_params) while labelled with both.
    """
    keys = {k for v in exp.variants for k in override_dict(v.params)}
    for other in running:
        if other.name == exp.name:
            continue
        if other.hash_salt == exp.hash_salt:
            return f"experiment {exp.name!r} hashes users with salt {exp.hash_salt!r}, as running experiment {other.name!r} does; set another salt"
        clash = sorted(keys & {k for v in other.variants for k in override_dict(v.params)}) if other.layer != exp.layer else []
        if clash:
            return f"experiment {exp.name!r} overrides {clash}, as running experiment {other.name!r} in layer {other.layer!r} does; a user in both would get only one"
    return None


def parse_definitions(raw: dict) -> tuple[list[Experiment], dict[str, str]]:
    """Valid experiments, and per name why the others could not be read. A hand-edited bad
    definition is skipped (its users get the defaults), never a reason to fail a request."""
    good, bad = [], {}
    for name, text in raw.items():
        name = name.decode() if isinstance(name, bytes) else name
        try:
            good.append(Experiment.model_validate_json(text))
        except ValidationError as exc:
            bad[name] = str(exc.errors()[0]["msg"])
    return good, bad


class ExperimentRegistry:
    def __init__(self, client: redis.Redis, keys: Keys):
        self.client = client
        self.keys = keys

    def get(self, name: str) -> Experiment:
        raw = self.client.hget(self.keys.experiments(), name)
        if raw is None:
            raise ExperimentError(f"no experiment named {name!r}")
        return Experiment.model_validate_json(raw)

    def list(self) -> list[Experiment]:
        good, bad = parse_definitions(self.client.hgetall(self.keys.experiments()))
        for name, why in bad.items():
            log.warning("experiment %s has an invalid definition: %s", name, why)
        return sorted(good, key=lambda e: e.name)

    def create(self, experiment: Experiment) -> Experiment:
        draft = experiment.model_copy(update={"status": "draft", "buckets": None, "started_at_ms": None, "stopped_at_ms": None})
        if not self.client.hsetnx(self.keys.experiments(), draft.name, draft.model_dump_json()):
            raise ExperimentError(f"experiment {draft.name!r} already exists")
        return draft

    def _update(self, name: str, change: Callable[[Experiment, list[Experiment]], Experiment]) -> Experiment:
        """Read-modify-write of one definition under WATCH; `change` sees every definition."""
        key = self.keys.experiments()
        # transaction=True explicitly: redis-py's cluster pipeline only WATCHes in one.
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    good, _ = parse_definitions(pipe.hgetall(key))
                    by_name = {e.name: e for e in good}
                    if name not in by_name:
                        raise ExperimentError(f"no experiment named {name!r}")
                    updated = change(by_name[name], good)
                    pipe.multi()
                    pipe.hset(key, name, updated.model_dump_json())
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

    def start(self, name: str) -> Experiment:
        """Claim a free bucket range in the layer and start assigning."""

        def claim(exp: Experiment, all_: list[Experiment]) -> Experiment:
            if exp.status != "draft":
                raise ExperimentError(f"experiment {name!r} is {exp.status}; only a draft can start")
            conflict = start_conflict(exp, [e for e in all_ if e.status == "running"])
            if conflict:
                raise ExperimentError(conflict)
            taken = [e.buckets for e in all_ if e.layer == exp.layer and e.status == "running" and e.buckets]
            buckets = free_range(taken, max(1, round(exp.traffic * LAYER_BUCKETS)))
            if buckets is None:
                raise ExperimentError(f"layer {exp.layer!r} has no free {exp.traffic:.1%} of traffic left")
            return exp.model_copy(update={"status": "running", "buckets": buckets, "started_at_ms": _now_ms()})

        return self._update(name, claim)

    def stop(self, name: str) -> Experiment:
        """The experiment-wide kill switch: replicas stop assigning within their refresh."""
        return self._update(name, lambda exp, _: exp.model_copy(update={"status": "stopped", "stopped_at_ms": _now_ms()}))

    def kill(self, experiment: str, variant: str, reason: str) -> None:
        """Stop assigning one variant (automatic rollback); its users fall back to defaults.
        A second kill keeps the first one's time: the variant's data end there."""
        if self.client.hsetnx(self.keys.experiment_kills(), kill_field(experiment, variant), json.dumps({"reason": reason, "at_ms": _now_ms()})):
            log.warning("killed variant %s of experiment %s: %s", variant, experiment, reason)
        else:
            log.info("variant %s of experiment %s was killed already", variant, experiment)

    def killed(self) -> dict[str, dict]:
        raw = self.client.hgetall(self.keys.experiment_kills())
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def killed_at(self, experiment: Experiment) -> dict[str, int | None]:
        """The experiment's killed variants and when each was killed (epoch ms; None if the
        entry carries no time)."""
        killed = self.killed()
        return {v.name: killed[f].get("at_ms") for v in experiment.variants if (f := kill_field(experiment.name, v.name)) in killed}

    def snapshot(self) -> tuple[list[Experiment], set[str]]:
        """Running experiments and killed variants, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.experiments()).hkeys(self.keys.experiment_kills())
        definitions, kills = pipe.execute()
        good, bad = parse_definitions(definitions)
        for name, why in bad.items():
            log.warning("skipping experiment %s, its definition is invalid: %s", name, why)
        return [e for e in good if e.status == "running" and e.buckets], {k.decode() for k in kills}
