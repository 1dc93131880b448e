"""What serving does when a feature flag (`args.flags`, app/config.py) is off.

Pure functions: the ingress applies them, tests check them without Ray.
"""

from __future__ import annotations

from app.config import ServingSettings

NON_PERSONALISED_SOURCES = ("trending", "popular")
"""The sources left when hybrid recommendations are off: nothing about the listener's taste."""


def disabled_detail(flag: str, what: str) -> dict:
    """The 503 body of a route whose feature is switched off: says what and which flag."""
    return {"detail": f"{what} are disabled on this deployment (flags.{flag} is false)", "flag": flag}


def non_personalised_overrides(serving: ServingSettings) -> dict:
    """Per-request serving overrides for `flags.hybrid_reco: false`: blend only trending and
    popular, for every segment, and fill short lists from them. The heard filter, blocks,
    diversity and artist caps still apply (they are not personalisation, they are hygiene)."""
    weights = {s: serving.source_weights.get(s, 0.0) for s in NON_PERSONALISED_SOURCES}
    if not any(w > 0 for w in weights.values()):
        weights = {s: 1.0 for s in NON_PERSONALISED_SOURCES}
    return {
        "source_weights": weights,
        "segment_weights": {segment: weights for segment in ("new", "casual", "heavy")},
        "fallback_chain": list(NON_PERSONALISED_SOURCES),
    }


def with_flags(params: dict | None, serving: ServingSettings, hybrid_reco: bool) -> dict | None:
    """An experiment variant's params, overridden by what the flags impose."""
    if hybrid_reco:
        return params
    return {**(params or {}), **non_personalised_overrides(serving)}
