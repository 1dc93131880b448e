"""Online/offline parity: does Redis hold exactly what the materialisation meant to write?"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from app.features.registry import FeatureView
from app.features.store import OnlineStore


def values_equal(kind: str, offline: Any, online: Any) -> bool:
    if offline is None or (isinstance(offline, float) and np.isnan(offline)):
        return online is None
    if online is None:
        return False
    if kind == "float32_vector":
        a, b = np.asarray(offline, dtype="<f4"), np.asarray(online, dtype="<f4")
        return a.shape == b.shape and bool(np.array_equal(a, b))
    if kind == "string_list":
        return [str(v) for v in offline] == list(online)
    if kind == "bool":
        return bool(offline) == bool(online)
    if kind == "int64":
        return int(offline) == int(online)
    if kind == "float64":
        return float(offline) == float(online)
    return str(offline) == str(online)


def compare_view(store: OnlineStore, namespace: str, view: FeatureView, offline: pd.DataFrame, sample: int, seed: int = 0) -> dict:
    """Sample entities of the offline snapshot and compare every field with the online row."""
    rows = offline.sample(n=min(sample, len(offline)), random_state=seed) if len(offline) else offline
    online = store.read(namespace, [(view, str(e)) for e in rows["entity_id"]]).rows
    mismatches = []
    for record, got in zip(rows.to_dict("records"), online):
        got = got or {}
        for field, spec in view.fields.items():
            if field in record and not values_equal(spec.type, record[field], got.get(field)):
                mismatches.append({"entity_id": record["entity_id"], "field": field})
    checked = len(rows) * sum(1 for f in view.fields if f in offline)
    return {
        "view": view.name,
        "entities": len(rows),
        "values": checked,
        "mismatches": len(mismatches),
        "mismatch_rate": len(mismatches) / checked if checked else 0.0,
        "examples": mismatches[:5],
    }
