"""The feature registry: feature views declared in YAML under `feature_repo/`.

Encoding in Redis: vectors are packed little-endian float32, lists are joined with U+001F,
scalars are text. A view names its entity, its typed fields, a TTL, where its data comes from and a version.
The version is part of every Redis key of the view, so a reader built for version 1 never
decodes version-2 bytes. Changing a published view incompatibly (removing a field, changing
its type) therefore requires a new version number; `check_compatible` refuses it otherwise.

    echotune features validate | list | describe NAME
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FieldType = Literal["float32_vector", "string", "string_list", "int64", "float64", "bool"]
Entity = Literal["user", "track", "artist"]


class RegistryError(ValueError):
    """A feature repo that cannot be used; the message names the file and field."""


class FieldSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: FieldType
    description: str = ""


class FeatureView(BaseModel):
    """A view and how its fields are encoded in Redis: vectors as packed little-endian float32
    (no parsing on the read path), lists joined with U+001F, scalars as text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    entity: Entity
    version: int = Field(1, ge=1)
    ttl_s: int = Field(gt=0)
    source: str = ""
    description: str = ""
    fields: dict[str, FieldSpec] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _short_field_form(cls, data: Any) -> Any:
        # Allow `fields: {n_plays: int64}` as shorthand for `{n_plays: {type: int64}}`.
        if isinstance(data, dict) and isinstance(data.get("fields"), dict):
            data = {**data, "fields": {k: {"type": v} if isinstance(v, str) else v for k, v in data["fields"].items()}}
        return data

    @property
    def key(self) -> str:
        """The view's name in Redis keys: name and version."""
        return f"{self.name}.v{self.version}"

    def encode(self, row: dict[str, Any]) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        for name, spec in self.fields.items():
            value = row.get(name)
            if value is None or (isinstance(value, float) and np.isnan(value)):
                continue
            if spec.type == "float32_vector":
                out[name] = np.asarray(value, dtype="<f4").tobytes()
            elif spec.type == "string_list":
                out[name] = _encode_list(name, value)
            elif spec.type == "bool":
                out[name] = "1" if value else "0"
            else:
                out[name] = str(value)
        return out

    def decode(self, raw: dict[bytes, bytes]) -> "Row":
        return Row(raw, self._decoders())

    def _decoders(self) -> dict[bytes, tuple[str, Any]]:
        # Built once per view: decoding runs for every entity of every request.
        cached = self.__dict__.get("_decoder_cache")
        if cached is None:
            cached = {name.encode(): (name, _DECODERS[spec.type]) for name, spec in self.fields.items()}
            self.__dict__["_decoder_cache"] = cached
        return cached


class Row(Mapping):
    """A feature row read from Redis, decoded field by field on first access.

    A request usually needs a few fields of many entities (the candidates' artist, say), so
    decoding every list and vector up front would cost more than the network round trip.
    Fields the view does not declare are invisible.
    """

    __slots__ = ("_raw", "_decoders", "_values")

    def __init__(self, raw: dict[bytes, bytes], decoders: dict[bytes, tuple[str, Any]]):
        self._raw = raw
        self._decoders = decoders
        self._values: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            pass
        key = name.encode()
        if key not in self._raw or key not in self._decoders:
            raise KeyError(name)
        value = self._values[name] = self._decoders[key][1](self._raw[key])
        return value

    def __iter__(self):
        return (self._decoders[k][0] for k in self._raw if k in self._decoders)

    def __len__(self) -> int:
        return sum(1 for k in self._raw if k in self._decoders)

    def __repr__(self) -> str:
        return f"Row({dict(self)!r})"


# Lists are joined with the ASCII unit separator: splitting is several times faster than
# json.loads, and the read path decodes a list field for every entity of every request.
_SEP = "\x1f"


def _encode_list(field: str, values) -> str:
    items = [str(v) for v in values]
    if any(_SEP in item for item in items):
        raise ValueError(f"{field}: list items may not contain the unit separator U+001F")
    return _SEP.join(items)


_DECODERS = {
    "float32_vector": lambda v: np.frombuffer(v, dtype="<f4"),
    "string_list": lambda v: v.decode().split(_SEP) if v else [],
    "int64": int,
    "float64": float,
    "bool": lambda v: v == b"1",
    "string": bytes.decode,
}


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    views: dict[str, FeatureView]

    def __getitem__(self, name: str) -> FeatureView:
        try:
            return self.views[name]
        except KeyError:
            raise RegistryError(f"unknown feature view {name!r}; known: {sorted(self.views)}") from None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> "Registry":
        return cls.model_validate_json(text)


def load_registry(repo_dir: str | Path) -> Registry:
    repo_dir = Path(repo_dir)
    files = sorted(repo_dir.glob("*.yaml"))
    if not files:
        raise RegistryError(f"no feature views (*.yaml) in {repo_dir}")
    views: dict[str, FeatureView] = {}
    for path in files:
        try:
            view = FeatureView.model_validate(yaml.safe_load(path.read_text()))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise RegistryError(f"{path.name}: {problems}") from None
        if view.name in views:
            raise RegistryError(f"{path.name}: feature view {view.name!r} is declared twice")
        views[view.name] = view
    return Registry(views=views)


def check_compatible(published: Registry, candidate: Registry) -> list[str]:
    """Why `candidate` may not replace `published` (empty when it may).

    Adding fields or views is compatible. Removing a field or changing its type under the same
    version is not: readers of that version would misread or miss data. Bump `version` instead.
    Dropping a whole view is allowed (its keys simply expire).
    """
    problems = []
    for name, old in published.views.items():
        new = candidate.views.get(name)
        if new is None or new.version != old.version:
            if new is not None and new.version < old.version:
                problems.append(f"{name}: version went down from {old.version} to {new.version}")
            continue
        for field, spec in old.fields.items():
            if field not in new.fields:
                problems.append(f"{name} v{old.version}: field {field!r} was removed; bump `version` to remove it")
            elif new.fields[field].type != spec.type:
                problems.append(
                    f"{name} v{old.version}: field {field!r} changed type {spec.type} -> {new.fields[field].type}; "
                    "bump `version` to change it"
                )
    return problems
