"""What an experiment is: variants with traffic weights and serving overrides, a layer, a
primary metric and guardrails. Validated with pydantic so that a definition that could break
serving (an unknown parameter, a negative cap, weights that do not parse) is refused when it
is created, and again when a replica loads it.

    exp = Experiment.model_validate_json(text)
    serving = apply_overrides(settings.serving, exp.variant("treatment").params)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.config import SOURCES, ServingSettings, variant_weights
from app.experiments.metrics import DESCRIPTIVE_METRICS, HIGHER_IS_BETTER

Name = str
NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"

LAYER_BUCKETS = 1000
"""Buckets per layer: experiments in a layer own disjoint bucket ranges, so a user is in at
most one of them (0.1% of the layer's traffic granularity)."""

Status = Literal["draft", "running", "stopped"]
Severity = Literal["info", "warning", "critical"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def known_metric(name: str) -> str:
    """A metric the evaluator reports, else a ValueError listing them: a misspelt name would
    otherwise match nothing, and its guardrail would never fire."""
    if name not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {name!r}; known: {sorted(HIGHER_IS_BETTER)}")
    return name


class ServingOverrides(_Strict):
    """The serving parameters a variant may change; anything else is refused."""

    source_weights: dict[str, float] | None = None
    mmr_lambda: float | None = Field(None, ge=0, le=1)
    artist_cap: int | None = Field(None, ge=1)
    candidates: int | None = Field(None, ge=1, le=5000)

    @model_validator(mode="after")
    def _weights(self) -> "ServingOverrides":
        if self.source_weights is not None:
            known = set(SOURCES)
            unknown = sorted(set(self.source_weights) - known)
            if unknown:
                raise ValueError(f"source_weights: unknown sources {unknown}; known: {sorted(known)}")
            if any(w < 0 for w in self.source_weights.values()):
                raise ValueError("source_weights must not be negative")
        return self


class Variant(_Strict):
    name: Name = Field(pattern=NAME_PATTERN)
    weight: float = Field(gt=0)
    """Relative share of the experiment's traffic."""
    params: ServingOverrides = ServingOverrides()


class Guardrail(_Strict):
    """One rule a treatment must not break.

    - threshold: the treatment's metric value against an absolute limit (`max` or `min`);
    - degradation: the relative lift's confidence interval lies entirely beyond `tolerance`
      in the harmful direction (harm beyond tolerance is established, not just estimated);
    - statistical: a significant change (adjusted p < alpha) in the harmful direction.
    """

    metric: str
    kind: Literal["threshold", "degradation", "statistical"]
    severity: Severity = "warning"
    max: float | None = None
    min: float | None = None
    tolerance: float = Field(0.0, ge=0)

    @field_validator("metric")
    @classmethod
    def _known(cls, name: str) -> str:
        return known_metric(name)

    @model_validator(mode="after")
    def _limits(self) -> "Guardrail":
        if self.kind == "threshold" and self.max is None and self.min is None:
            raise ValueError("a threshold guardrail needs max or min")
        if self.kind != "threshold" and self.metric in DESCRIPTIVE_METRICS:
            raise ValueError(f"{self.metric} is descriptive (never tested): only a threshold guardrail can watch it")
        return self


def default_guardrails() -> list[Guardrail]:
    return [
        Guardrail(metric="latency_p95_ms", kind="threshold", max=500.0, severity="critical"),
        Guardrail(metric="skip_rate", kind="degradation", tolerance=0.05, severity="critical"),
        Guardrail(metric="listening_ms_per_user", kind="degradation", tolerance=0.05, severity="critical"),
        Guardrail(metric="ctr", kind="statistical", severity="warning"),
        Guardrail(metric="like_rate", kind="statistical", severity="warning"),
        Guardrail(metric="sessions_per_user", kind="statistical", severity="warning"),
    ]


class Experiment(_Strict):
    name: Name = Field(pattern=NAME_PATTERN)
    description: str = ""
    layer: Name = Field("default", pattern=NAME_PATTERN)
    """Experiments in one layer are mutually exclusive; layers are independent of each other."""
    traffic: float = Field(1.0, gt=0, le=1)
    """Share of the layer's users in this experiment."""
    salt: str | None = None
    """Seeds the variant hash; defaults to the name. A new salt reshuffles users."""
    control: Name = "control"
    variants: list[Variant] = Field(min_length=2)
    primary_metric: str = "ctr"
    guardrails: list[Guardrail] = Field(default_factory=default_guardrails)
    status: Status = "draft"
    buckets: tuple[int, int] | None = None
    """Layer buckets [start, end) owned while running; set by `start`."""
    started_at_ms: int | None = None
    stopped_at_ms: int | None = None

    @field_validator("primary_metric")
    @classmethod
    def _primary(cls, name: str) -> str:
        known_metric(name)
        if name in DESCRIPTIVE_METRICS:
            raise ValueError(f"{name} is descriptive (never tested) and cannot decide a ship; tested: {sorted(set(HIGHER_IS_BETTER) - DESCRIPTIVE_METRICS)}")
        return name

    @model_validator(mode="after")
    def _variants(self) -> "Experiment":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique: {names}")
        if self.control not in names:
            raise ValueError(f"control {self.control!r} is not one of the variants {names}")
        if self.buckets is not None and not 0 <= self.buckets[0] < self.buckets[1] <= LAYER_BUCKETS:
            raise ValueError(f"buckets must be a range within [0, {LAYER_BUCKETS})")
        return self

    @property
    def hash_salt(self) -> str:
        return self.salt or self.name

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"experiment {self.name!r} has no variant {name!r}")

    @property
    def treatments(self) -> list[str]:
        return [v.name for v in self.variants if v.name != self.control]


def override_dict(params: ServingOverrides) -> dict[str, Any]:
    return params.model_dump(exclude_none=True)


def apply_overrides(serving: ServingSettings, params: dict[str, Any] | None) -> ServingSettings:
    """The serving settings with a variant's overrides, validated (model_copy would skip
    validation). Raises ValueError on anything ServingOverrides or ServingSettings refuses."""
    if not params:
        return serving
    try:
        checked = variant_weights(serving, override_dict(ServingOverrides.model_validate(params)))
        return ServingSettings.model_validate({**serving.model_dump(), **checked})
    except ValidationError as exc:
        raise ValueError(f"invalid serving overrides {params}: {exc.errors()[0]['msg']}") from None
