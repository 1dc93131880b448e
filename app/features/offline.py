"""Offline feature snapshots: every materialisation also lands as Parquet, one file per view.

They serve two needs the online store cannot: point-in-time retrieval for training and
evaluation (the features as they were when each event happened, so no label leaks into its
own features) and the parity check (is Redis holding what we meant to write?).

A snapshot counts only once `finish` has written its namespace record, so a materialisation
that died half-way is never used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from app.features.registry import FeatureView, Registry


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class OfflineSnapshots:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _file(self, view: FeatureView, namespace: str) -> Path:
        return self.root / view.key / f"{namespace}.parquet"

    def write(self, namespace: str, view: FeatureView, rows: pd.DataFrame, as_of) -> Path:
        frame = rows[[c for c in view.fields if c in rows]].rename_axis("entity_id").reset_index()
        frame["entity_id"] = frame["entity_id"].astype(str)
        for name, spec in view.fields.items():
            if name in frame and spec.type == "float32_vector":
                frame[name] = frame[name].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else np.asarray(v, "<f4"))
        frame["as_of"] = pd.Timestamp(as_of) if as_of is not None else pd.NaT
        path = self._file(view, namespace)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        frame.to_parquet(tmp)
        os.replace(tmp, path)
        return path

    def finish(self, namespace: str, registry: Registry, meta: dict) -> None:
        record = {"namespace": namespace, "meta": meta, "registry": json.loads(registry.to_json())}
        _write_text_atomic(self.root / "namespaces" / f"{namespace}.json", json.dumps(record, default=str))
        _write_text_atomic(self.root / "registry.json", registry.to_json())

    def published_registry(self) -> Registry | None:
        path = self.root / "registry.json"
        return Registry.from_json(path.read_text()) if path.exists() else None

    def namespaces(self) -> pd.DataFrame:
        """Completed materialisations, oldest data first: namespace, as_of."""
        records = [json.loads(p.read_text()) for p in sorted((self.root / "namespaces").glob("*.json"))]
        frame = pd.DataFrame(
            {"namespace": [r["namespace"] for r in records], "as_of": [r["meta"].get("as_of") for r in records]}
        )
        frame["as_of"] = pd.to_datetime(frame["as_of"], utc=True)
        return frame.sort_values(["as_of", "namespace"]).reset_index(drop=True)

    def load(self, view: FeatureView, namespace: str) -> pd.DataFrame:
        return pd.read_parquet(self._file(view, namespace))

    def point_in_time(self, view: FeatureView, entities: pd.DataFrame) -> pd.DataFrame:
        """Join each (entity_id, timestamp) row with the view's values from the latest snapshot
        whose data ends strictly before that timestamp; rows before any snapshot get nulls.

        Strictly: a snapshot's `as_of` is its latest event, so one ending at an event's own
        time was built from that event, and its features would leak the label. Of snapshots
        with the same `as_of`, the later materialisation (namespaces sort by time) wins."""
        snaps = self.namespaces()
        snaps = snaps[[self._file(view, ns).exists() for ns in snaps["namespace"]]]
        frames = [self.load(view, ns).assign(_ns=ns) for ns in snaps["namespace"]]
        left = entities.assign(
            entity_id=entities["entity_id"].astype(str), timestamp=pd.to_datetime(entities["timestamp"], utc=True)
        )
        left = left.reset_index(names="_row").sort_values("timestamp")
        if not frames:
            return left.sort_values("_row").drop(columns="_row").reset_index(drop=True)
        right = pd.concat(frames, ignore_index=True).dropna(subset=["as_of"]).sort_values(["as_of", "_ns"], kind="stable")
        right["as_of"] = pd.to_datetime(right["as_of"], utc=True).astype(left["timestamp"].dtype)
        joined = pd.merge_asof(
            left, right, left_on="timestamp", right_on="as_of", by="entity_id", direction="backward", allow_exact_matches=False
        )
        return joined.sort_values("_row").drop(columns=["_row", "_ns"]).reset_index(drop=True)
