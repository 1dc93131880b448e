"""What `jobs.pipeline` remembers between runs: input fingerprints and run manifests.

Layout under `<state_dir>/pipeline/`:
- `state.json`: per stage, the fingerprint of the inputs it last succeeded on and the
  version (artifact version or feature namespace) that run published. A stage is up to date
  when its inputs hash to the same fingerprint AND that version is still the one published:
  a version published by hand since then makes the stage run again rather than trust a stale
  record.
- `runs/<run_id>.json`: one manifest per run, rewritten after every stage (so a run that dies
  half way still shows how far it got), each stage with its outcome, reason, timing and the
  summary its job returned. `runs/LATEST` names the newest run.

Every file is written to a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

Outcome = Literal["ok", "skipped", "failed", "not_run"]


def fingerprint(*parts: Any) -> str:
    """sha256 of the parts as canonical JSON: equal inputs give equal fingerprints."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def files_fingerprint(paths: list[str | Path]) -> str:
    """Names, sizes and modification times: changes when a file is added, removed or rewritten,
    without reading the data (the event Parquet can be large)."""
    rows = []
    for p in sorted(str(p) for p in paths):
        st = os.stat(p)
        rows.append((p, st.st_size, st.st_mtime_ns))
    return fingerprint(rows)


def file_digest(path: Path) -> str | None:
    """sha256 of a small input file (the catalogue); None when it does not exist."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)


class PipelineState:
    """Fingerprint and published version of each stage's last success."""

    def __init__(self, root: Path):
        self.path = Path(root) / "state.json"

    def load(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def is_current(self, stage: str, fp: str, published_version: str | None) -> bool:
        last = self.load().get(stage)
        return bool(last) and published_version is not None and last["fingerprint"] == fp and last["version"] == published_version

    def record(self, stage: str, fp: str, version: str | None) -> None:
        doc = self.load()
        doc[stage] = {"fingerprint": fp, "version": version, "at": _now()}
        _write_json(self.path, doc)


@dataclass
class StageRecord:
    stage: str
    outcome: Outcome = "not_run"
    reason: str | None = None
    """Why it was skipped or what made it fail."""
    seconds: float | None = None
    started_at: str | None = None
    fingerprint: str | None = None
    summary: dict = field(default_factory=dict)
    """What the job returned (versions, counts), as its own JSON summary line."""


class RunManifest:
    """The record of one pipeline run; `save()` after each stage."""

    def __init__(self, root: Path, run_id: str, stages: list[str], config: dict):
        self.dir = Path(root) / "runs"
        self.run_id = run_id
        self.started_at = _now()
        self.finished_at: str | None = None
        self.config = config
        self.stages = {name: StageRecord(name) for name in stages}

    @property
    def path(self) -> Path:
        return self.dir / f"{self.run_id}.json"

    @property
    def outcome(self) -> str:
        outcomes = {s.outcome for s in self.stages.values()}
        if "failed" in outcomes:
            return "failed"
        return "ok" if self.finished_at else "running"

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "outcome": self.outcome,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "config": self.config,
            "stages": [vars(s) for s in self.stages.values()],
        }

    def save(self) -> None:
        _write_json(self.path, self.to_dict())
        tmp = self.dir / ".LATEST.tmp"
        tmp.write_text(self.run_id)
        os.replace(tmp, self.dir / "LATEST")

    def finish(self) -> dict:
        self.finished_at = _now()
        self.save()
        return self.to_dict()


def latest_run(root: Path) -> dict | None:
    """The newest run manifest, or None before the first run."""
    runs = Path(root) / "runs"
    try:
        run_id = (runs / "LATEST").read_text().strip()
    except FileNotFoundError:
        return None
    return json.loads((runs / f"{run_id}.json").read_text())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
