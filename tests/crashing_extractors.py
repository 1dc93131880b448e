"""Extractors that fail on chosen tracks, for the content job's crash tests
(tests/test_content_job.py).

A module of their own, importing nothing heavy: every actor Ray Data starts, and restarts after
each crash, imports the module that defines its class, and the test module's imports
(librosa through training.cold_start) cost several seconds per actor on a slow machine.
"""

from __future__ import annotations

import os

import pandas as pd


class FailsOnTrackT3:
    """An extractor whose process dies on any batch holding track t3, as a decoder crashing in
    native code would (or, `raises`, one that raises an exception analyse_tracks does not
    catch), and answers the others."""

    raises = False

    def __init__(self, sample_rate: int, max_seconds: float):
        pass

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if (batch["track_id"] == "t3").any():
            if self.raises:
                raise RuntimeError("decoder bug on t3")
            os._exit(1)
        return batch[["track_id"]].assign(error_reason=None)


class RaisesOnTrackT3(FailsOnTrackT3):
    raises = True


class FailsOnTracksT3AndT5(FailsOnTrackT3):
    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if batch["track_id"].isin(["t3", "t5"]).any():
            os._exit(1)
        return batch[["track_id"]].assign(error_reason=None)


class DiesOnEveryBatch(FailsOnTrackT3):
    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        os._exit(1)
