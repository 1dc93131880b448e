"""Real audio, downloaded at run time: the immich-memories-music clips and their labels.

The full accuracy figures over all 28 clips (and the Debian soundtrack) are in
benchmarks/audio.py; this checks that the loader reads the wheel's ground truth right and that
the analysis recovers tempo and key on clips whose labels it is known to match, with the job's
30 s window.

    .venv/bin/pytest tests/test_content_real_audio.py -q
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from app.data.audio_catalog import immich_music_catalog, normalise_catalog
from training.content import analyse_tracks


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> pd.DataFrame:
    return immich_music_catalog(tmp_path_factory.mktemp("cache"))


def test_catalog_has_the_28_labelled_clips(catalog):
    assert len(catalog) == 28 and catalog["track_id"].is_unique
    assert catalog.groupby("mood").size().to_dict() == {"calm": 5, "energetic": 5, "happy": 6, "nostalgic": 6, "tender": 6}
    row = catalog.set_index("title").loc["nostalgic_electronic_2"]
    assert row["tempo_bpm"] == 84 and row["key"] == "A# minor"  # "Bb minor" in the licence
    tracks, rejected = normalise_catalog(catalog)
    assert rejected.empty and list(tracks["genres"].iloc[0]) in (["acoustic"], ["electronic"])


def test_tempo_and_key_of_real_clips(catalog):
    clips = catalog.set_index("title").loc[["happy_acoustic_1", "tender_electronic_1"]].reset_index()
    analysis = analyse_tracks(clips, sr=22050, max_seconds=30.0)
    assert analysis["error_reason"].isna().all()
    assert analysis["truncated"].all()  # the clips run about 33 s: the window caps them
    np.testing.assert_allclose(analysis["tempo_bpm"], clips["tempo_bpm"], rtol=0.04)
    assert analysis["key"].tolist() == clips["key"].tolist()
