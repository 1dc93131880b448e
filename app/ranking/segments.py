"""User segments: a listener with three plays and one with three thousand need different
blends (the first has no CF signal worth trusting)."""

from __future__ import annotations

from typing import Literal

Segment = Literal["new", "casual", "heavy"]


def user_segment(n_plays: int | None, casual_from: int, heavy_from: int) -> Segment:
    plays = n_plays or 0
    if plays >= heavy_from:
        return "heavy"
    if plays >= casual_from:
        return "casual"
    return "new"
