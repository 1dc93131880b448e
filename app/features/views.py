"""Feature views served online, and how each field is encoded in Redis.

Vectors are packed float32 bytes (4 bytes a dimension, no parsing on the read path); lists are
JSON; scalars are their text. Declared in code for now; the YAML registry replaces this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

FieldType = Literal["vector", "json", "str", "int", "float"]


@dataclass(frozen=True)
class FeatureView:
    name: str
    entity: str
    fields: dict[str, FieldType]
    ttl_s: int

    def encode(self, row: dict[str, Any]) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        for name, kind in self.fields.items():
            if name not in row or row[name] is None:
                continue
            value = row[name]
            if kind == "vector":
                out[name] = np.asarray(value, dtype="<f4").tobytes()
            elif kind == "json":
                out[name] = json.dumps(value, separators=(",", ":"))
            else:
                out[name] = str(value)
        return out

    def decode(self, raw: dict[bytes, bytes]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.decode()
            kind = self.fields.get(name)
            if kind == "vector":
                out[name] = np.frombuffer(value, dtype="<f4")
            elif kind == "json":
                out[name] = json.loads(value)
            elif kind == "int":
                out[name] = int(value)
            elif kind == "float":
                out[name] = float(value)
            elif kind == "str":
                out[name] = value.decode()
        return out


USER_PROFILE = FeatureView(
    name="user_profile",
    entity="user",
    fields={"cf_vector": "vector", "recent_tracks": "json", "seen_tracks": "json", "top_genres": "json", "n_plays": "int"},
    ttl_s=30 * 24 * 3600,
)

VIEWS = {v.name: v for v in (USER_PROFILE,)}
