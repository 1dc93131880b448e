"""The EchoTune Serve application, built from `ray_config.yaml`.

    serve run ray_config.yaml          # or: serve deploy ray_config.yaml
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from app.config import Settings, settings_from_args
from deployments.features import FeatureFetcher
from deployments.gateway import EventGateway
from deployments.ingress import ApiIngress
from deployments.ranking import Blender, Reranker
from deployments.retrieval import CFRetriever, ContentRetriever
from deployments.trending import Trending


def build_app(args: dict[str, Any]) -> Application:
    """Validate the application's args into Settings (naming any wrong key) and wire the DAG."""
    return wire(settings_from_args(args))


def wire(settings: Settings) -> Application:
    """The deployment DAG. Ranking knobs can then change at run time through each deployment's
    `user_config` (the `deployments:` list of ray_config.yaml; see deployments/tuning.py)."""
    return ApiIngress.bind(
        settings,
        EventGateway.bind(settings),
        FeatureFetcher.bind(settings),
        Blender.bind(settings),
        Reranker.bind(settings),
        Trending.bind(settings),
        cf_retriever=CFRetriever.bind(settings),
        content_retriever=ContentRetriever.bind(settings),
    )
