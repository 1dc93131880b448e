"""Trending on a synthetic event log with a known answer.

    .venv/bin/pytest tests/test_trending.py -q
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from app.config import TrendingSettings
from training.trending import COLUMNS, trending_scores

NOW = pd.Timestamp("2026-11-01T00:00:00Z")
# A lenient significance budget: these tests check the model's mechanics on a hand-made log;
# the default budget's quality is guarded on simulated worlds in test_trending_job.py.
SETTINGS = TrendingSettings(
    window_hours=24, baseline_hours=144, min_plays=5, top_k=50, false_trends_per_run=1.0
)


def plays(track_id, n: int, start_hours_ago: float, end_hours_ago: float, rng, event_type="play") -> pd.DataFrame:
    """n events uniformly spread over [now - start, now - end)."""
    offsets = rng.uniform(end_hours_ago, start_hours_ago, size=n)
    return pd.DataFrame(
        {
            "track_id": track_id,
            "event_type": event_type,
            "timestamp": NOW - pd.to_timedelta(offsets, unit="h"),
        }
    )


@pytest.fixture
def events() -> pd.DataFrame:
    """A week of history: 20 steady hits at ~2 plays/h and a long tail of 100 tracks at ~0.05/h
    (catalogue mean ~0.4/h, so an average track gets ~9 plays a day). In the last day:
    'burst' goes from 2/h to 12/h; 'quiet' (0.05/h) gets 4 plays; three tracks appear for the
    first time: 'newcomer' with 30 plays, 'lukewarm' with 8, 'trickle' with 3."""
    rng = np.random.default_rng(0)
    parts = [plays(f"steady{i}", rng.poisson(2 * 168), 168, 0, rng) for i in range(20)]
    parts += [plays(f"tail{i}", rng.poisson(0.05 * 168), 168, 0, rng) for i in range(100)]
    parts += [
        plays("burst", 2 * 144, 168, 24, rng),
        plays("burst", 12 * 24, 24, 0, rng),
        plays("quiet", 7, 168, 24, rng),
        plays("quiet", 4, 24, 0, rng),
        plays("newcomer", 30, 24, 0, rng),
        plays("lukewarm", 8, 24, 0, rng),
        plays("trickle", 3, 24, 0, rng),
        plays("steady0", 50, 24, 0, rng, event_type="skip"),  # unweighted type: ignored
        plays("burst", 500, 0, -5, rng),  # in the future: ignored
    ]
    return pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=1)


def test_columns_and_order(events):
    result = trending_scores(events, NOW, SETTINGS)
    assert list(result.columns) == COLUMNS
    assert result["score"].is_monotonic_decreasing
    assert (result["score"] > 0).all() and (result["observed"] >= SETTINGS.min_plays).all()
    assert result["confidence"].between(0, 1).all()


def test_burst_ranks_first(events):
    result = trending_scores(events, NOW, SETTINGS)
    top = result.iloc[0]
    assert top["track_id"] == "burst"
    assert top["observed"] == 288  # future plays excluded
    assert top["velocity"] == pytest.approx(12 - 2, abs=0.5)
    assert top["confidence"] > 0.999


def test_new_track_with_significant_burst_trends(events):
    result = trending_scores(events, NOW, SETTINGS).set_index("track_id")
    assert "newcomer" in result.index
    # No history: judged against an average catalogue track (~0.4/h), not against zero.
    assert 5 < result.loc["newcomer", "expected"] < 15
    assert result.loc["newcomer", "confidence"] > 0.99


def test_new_track_must_beat_an_average_track(events):
    """8 plays clears min_plays but is what an average track gets: not trending."""
    result = trending_scores(events, NOW, SETTINGS)
    assert "lukewarm" not in result["track_id"].tolist()


def test_steady_tracks_do_not_trend(events):
    result = trending_scores(events, NOW, SETTINGS)
    assert result["track_id"].tolist()[:2] == ["burst", "newcomer"]
    others = result[~result["track_id"].isin(["burst", "newcomer"])]
    # Poisson noise alone lets a steady track edge above its mean; it must stay far from a burst.
    assert (others["score"] < 3.5).all()
    assert (others["confidence"] < 0.999).all()


def test_counts_under_min_plays_do_not_trend(events):
    """'quiet' quadruples its rate, which is significant, but 4 plays are under min_plays."""
    result = trending_scores(events, NOW, SETTINGS)
    assert "quiet" not in result["track_id"].tolist()
    # With no floor and no significance bar, 'quiet' shows up as above its expectation.
    everything = SETTINGS.model_copy(update={"min_plays": 1, "false_trends_per_run": 1e6})
    lenient = trending_scores(events, NOW, everything).set_index("track_id")
    assert lenient.loc["quiet", "score"] > 1
    assert "trickle" not in lenient.index  # 3 plays for a new track is below average, not a trend


def test_event_weights_apply(events):
    likes = plays("liked", 15, 24, 0, np.random.default_rng(5), event_type="like")
    result = trending_scores(pd.concat([events, likes]), NOW, SETTINGS).set_index("track_id")
    assert result.loc["liked", "observed"] == 30  # likes weigh 2


def test_top_k_caps_rows(events):
    result = trending_scores(events, NOW, SETTINGS.model_copy(update={"top_k": 1}))
    assert result["track_id"].tolist() == ["burst"]


def test_catalogue_lowers_prior_for_new_tracks(events):
    """Unplayed catalogue tracks lower the catalogue mean, so a newcomer is more surprising."""
    catalogue = pd.DataFrame({"track_id": [f"t{i}" for i in range(500)]})
    alone = trending_scores(events, NOW, SETTINGS).set_index("track_id")
    with_catalogue = trending_scores(events, NOW, SETTINGS, tracks=catalogue).set_index("track_id")
    assert with_catalogue.loc["newcomer", "expected"] < alone.loc["newcomer", "expected"]


def test_empty_and_naive_now(events):
    assert trending_scores(events.iloc[:0], NOW, SETTINGS).empty
    naive = trending_scores(events, NOW.tz_localize(None), SETTINGS)
    pd.testing.assert_frame_equal(naive, trending_scores(events, NOW, SETTINGS))


def test_fresh_deployment_without_baseline():
    rng = np.random.default_rng(2)
    events = pd.concat([plays("a", 40, 24, 0, rng), plays("b", 6, 24, 0, rng)])
    result = trending_scores(events, NOW, SETTINGS)
    assert result["track_id"].tolist() == ["a", "b"]
    assert np.isfinite(result[["score", "expected", "confidence"]].to_numpy()).all()


def test_missing_column_raises(events):
    with pytest.raises(ValueError, match="event_type"):
        trending_scores(events.drop(columns="event_type"), NOW, SETTINGS)


def test_release_date_sets_history_length(events):
    """A track released long ago with no plays until today has a real, empty history: 8 plays
    are then a surprise, where for a track released today they are average."""
    catalogue = pd.DataFrame(
        {
            "track_id": ["lukewarm", "newcomer"],
            "release_date": [NOW - pd.Timedelta(days=300), NOW - pd.Timedelta(hours=20)],
        }
    )
    result = trending_scores(events, NOW, SETTINGS, tracks=catalogue).set_index("track_id")
    assert "lukewarm" in result.index and result.loc["lukewarm", "expected"] < 1
    assert 5 < result.loc["newcomer", "expected"] < 15
