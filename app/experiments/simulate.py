"""Simulated experiments with a known truth: A/A tests (no effect) and effects of known size.

Two levels: `simulate_ctr_arms` draws per-user impressions and clicks directly (fast enough
for thousands of experiments in a test), and `simulate_events` writes a whole event log in
the exported Parquet schema (impressions with experiment and variant, clicks, plays with
durations, likes, skips, sessions, a pre-period), which the evaluator job reads like real
data. Users differ in their click and listening propensity, so per-impression tests would be
wrong, and their pre-period listening predicts their in-experiment listening (CUPED has work).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.experiments.metrics import DAY_MS


@dataclass(frozen=True)
class Arm:
    clicks: np.ndarray
    impressions: np.ndarray


def simulate_ctr_arms(rng: np.random.Generator, n_users: int, base_ctr: float, rel_effect: float = 0.0, mean_impressions: float = 30.0, concentration: float = 4.0) -> tuple[Arm, Arm]:
    """Control and treatment arms of per-user (clicks, impressions); each user's click
    probability is Beta-distributed around the arm's CTR."""
    arms = []
    for ctr in (base_ctr, base_ctr * (1 + rel_effect)):
        impressions = 1 + rng.poisson(mean_impressions - 1, n_users)
        p = rng.beta(ctr * concentration, (1 - ctr) * concentration, n_users)
        arms.append(Arm(rng.binomial(impressions, p).astype(float), impressions.astype(float)))
    return arms[0], arms[1]


@dataclass(frozen=True)
class Effect:
    """Relative changes a variant makes to the truth."""

    ctr: float = 0.0
    listening: float = 0.0
    skip: float = 0.0
    latency: float = 0.0


@dataclass(frozen=True)
class EventSimulation:
    experiment: str = "sim"
    variants: tuple[str, ...] = ("control", "treatment")
    weights: tuple[float, ...] = (0.5, 0.5)
    effects: dict[str, Effect] = field(default_factory=dict)
    n_users: int = 2000
    n_tracks: int = 500
    n_genres: int = 8
    days: int = 7
    start_ms: int = 1_790_000_000_000
    recs_per_user: float = 3.0
    k: int = 10
    plays_per_user: float = 12.0
    base_ctr: float = 0.05
    like_rate: float = 0.1
    skip_rate: float = 0.25
    latency_ms: float = 40.0
    seed: int = 0


def _strings(prefix: str, ints: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(ints), pa.string()), "")


def simulate_events(sim: EventSimulation) -> tuple[pa.Table, pa.Table]:
    """(events, catalogue). Events follow the export schema's relevant columns; the catalogue
    has track_id and genre."""
    rng = np.random.default_rng(sim.seed)
    n = sim.n_users
    variant = rng.choice(len(sim.variants), n, p=np.asarray(sim.weights) / sum(sim.weights))
    eff = [sim.effects.get(v, Effect()) for v in sim.variants]
    ctr_mult = np.array([1 + e.ctr for e in eff])[variant]
    listen_mult = np.array([1 + e.listening for e in eff])[variant]
    skip_mult = np.array([1 + e.skip for e in eff])[variant]
    lat_mult = np.array([1 + e.latency for e in eff])[variant]
    span = sim.days * DAY_MS
    first = sim.start_ms + rng.integers(0, span // 2, n)
    user_ids = _strings("u", np.arange(n))
    propensity = rng.beta(sim.base_ctr * 4, (1 - sim.base_ctr) * 4, n)
    activity = rng.gamma(2.0, sim.plays_per_user / 2.0, n)
    genres = rng.integers(0, sim.n_genres, sim.n_tracks)

    # Recommendations and their impressions.
    recs = 1 + rng.poisson(sim.recs_per_user - 1, n)
    rec_user = np.repeat(np.arange(n), recs)
    n_recs = len(rec_user)
    rec_ts = first[rec_user] + np.where(np.r_[True, rec_user[1:] != rec_user[:-1]], 0, rng.integers(0, span // 2, n_recs))
    rec_latency = np.maximum(1, rng.lognormal(np.log(sim.latency_ms), 0.4, n_recs) * lat_mult[rec_user]).astype(np.int64)
    imp_rec = np.repeat(np.arange(n_recs), sim.k)
    imp_user = rec_user[imp_rec]
    imp_track = rng.integers(0, sim.n_tracks, len(imp_rec))
    clicked = rng.random(len(imp_rec)) < np.clip(propensity[imp_user] * ctr_mult[imp_user], 0, 1)

    # Plays in the experiment and in the week before the first exposure.
    plays = rng.poisson(activity * listen_mult)
    pre_plays = rng.poisson(activity)
    play_user = np.repeat(np.arange(n), plays)
    pre_user = np.repeat(np.arange(n), pre_plays)
    play_ts = first[play_user] + rng.integers(0, span // 2, len(play_user))
    pre_ts = first[pre_user] - rng.integers(1, 7 * DAY_MS, len(pre_user))
    all_play_user = np.concatenate([play_user, pre_user])
    all_play_ts = np.concatenate([play_ts, pre_ts])
    duration = rng.exponential(180_000, len(all_play_user)).astype(np.int64)
    session = all_play_user * 1000 + (all_play_ts // (6 * 3600 * 1000)) % 1000
    outcome = rng.random(len(all_play_user))
    like = outcome < sim.like_rate
    skip = outcome > 1 - sim.skip_rate * skip_mult[all_play_user]

    parts = {
        "impression": (imp_user, rec_ts[imp_rec], imp_track, np.tile(np.arange(sim.k), n_recs), imp_rec, rec_latency[imp_rec], True),
        "click": (imp_user[clicked], rec_ts[imp_rec][clicked] + 1000, imp_track[clicked], None, imp_rec[clicked], None, False),
        "play": (all_play_user, all_play_ts, rng.integers(0, sim.n_tracks, len(all_play_user)), None, None, duration, False),
        "like": (all_play_user[like], all_play_ts[like] + 1, rng.integers(0, sim.n_tracks, int(like.sum())), None, None, None, False),
        "skip": (all_play_user[skip], all_play_ts[skip] + 1, rng.integers(0, sim.n_tracks, int(skip.sum())), None, None, None, False),
    }
    tables = []
    for etype, (users, ts, tracks, position, rec, dur, exposure) in parts.items():
        m = len(users)
        sess = session if etype == "play" else None
        tables.append(
            pa.table(
                {
                    "user_id": pc.take(user_ids, pa.array(users)),
                    "track_id": _strings("t", tracks),
                    "event_type": pa.array(np.full(m, etype)),
                    "timestamp": pa.array(ts.astype(np.int64)).cast(pa.timestamp("ms", tz="UTC")),
                    "duration_ms": pa.array(dur, pa.int64()) if dur is not None else pa.nulls(m, pa.int64()),
                    "position": pa.array(position, pa.int64()) if position is not None else pa.nulls(m, pa.int64()),
                    "recommendation_id": _strings("r", rec) if rec is not None else pa.nulls(m, pa.string()),
                    "experiment": pa.array(np.full(m, sim.experiment)) if exposure else pa.nulls(m, pa.string()),
                    "variant": pc.take(pa.array(list(sim.variants)), pa.array(variant[users])) if exposure else pa.nulls(m, pa.string()),
                    "session_id": _strings("s", sess) if sess is not None else pa.nulls(m, pa.string()),
                }
            )
        )
    events = pa.concat_tables(tables)
    catalogue = pa.table({"track_id": _strings("t", np.arange(sim.n_tracks)), "genre": _strings("g", genres)})
    return events, catalogue
