"""Versioned model artifacts on a filesystem, published atomically.

Layout: `<root>/<name>/<version>/` holds the files and a `manifest.json` (sha256 of every
file, counts, parameters); `<root>/<name>/LATEST` names the current version. A job writes into
a hidden staging folder, renames it into place and only then swaps `LATEST` with
`os.replace`, so a reader (a Serve replica, the materialiser) sees either the old version or
the new one, never half of one. A failed job leaves the previous version serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from contextlib import contextmanager


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_version() -> str:
    """Sortable by time, unique across concurrent writers."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class Artifact:
    name: str
    version: str
    path: Path
    manifest: dict[str, Any]

    def file(self, rel: str) -> Path:
        return self.path / rel


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    @contextmanager
    def publish(self, name: str, meta: dict[str, Any] | None = None) -> Iterator[Path]:
        """Yield a staging folder; on clean exit write the manifest and publish it.

        On an exception the staging folder is removed and LATEST is untouched.
        """
        version = new_version()
        base = self.root / name
        base.mkdir(parents=True, exist_ok=True)
        staging = base / f".staging-{version}"
        staging.mkdir()
        try:
            yield staging
            files = {
                str(p.relative_to(staging)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
            manifest = {
                "name": name,
                "version": version,
                "created_at": datetime.now(timezone.utc).isoformat(),
                "files": files,
                **(meta or {}),
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            final = base / version
            os.rename(staging, final)
            pointer = base / f".LATEST-{version}"
            pointer.write_text(version)
            os.replace(pointer, base / "LATEST")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def republish(self, name: str, version: str | None = None) -> str:
        """Publish a copy of `version` (default: the latest) as a new version and return it.
        Publishing an older version is how a model is rolled back: serving replicas pick it
        up like any publish (app/refresh.py). Its manifest keeps the original's metadata."""
        source = self.get(name, version) if version else self.latest(name)
        if source is None:
            raise FileNotFoundError(f"no published {name!r} to republish")
        meta = {k: v for k, v in source.manifest.items() if k not in ("name", "version", "created_at", "files")}
        with self.publish(name, meta=meta) as out:
            for rel in source.manifest["files"]:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source.file(rel), out / rel)
        return self.latest_version(name)

    def latest_version(self, name: str) -> str | None:
        try:
            return (self.root / name / "LATEST").read_text().strip() or None
        except FileNotFoundError:
            return None

    def latest(self, name: str) -> Artifact | None:
        version = self.latest_version(name)
        return None if version is None else self.get(name, version)

    def get(self, name: str, version: str) -> Artifact:
        path = self.root / name / version
        manifest = json.loads((path / "manifest.json").read_text())
        return Artifact(name=name, version=version, path=path, manifest=manifest)

    def verify(self, artifact: Artifact) -> list[str]:
        """Files whose content no longer matches the manifest (empty when intact)."""
        return [
            rel
            for rel, info in artifact.manifest["files"].items()
            if not artifact.file(rel).exists() or sha256_file(artifact.file(rel)) != info["sha256"]
        ]
