"""The whole batch side in one command: export → content, CF and trending in parallel →
materialise → parity check, skipping every stage whose inputs have not changed.

    ray job submit --working-dir . -- python -m jobs.pipeline --config ray_config.yaml
    ray job submit --working-dir . -- python -m jobs.pipeline --config ray_config.yaml --force

Up to date means (fingerprints in `<state_dir>/pipeline/state.json`, see app/pipeline_state.py):
- export: the stream has no entry past the export cursor and no chunk is in flight;
- content / CF / trending: the exported Parquet files (names, sizes, mtimes), the catalogue
  and the job's settings hash as on the run that published the current LATEST version;
- materialise: the three LATEST versions, the Parquet files, the feature repo and the
  settings it reads hash as on the run that published the current feature namespace.
The parity check always runs (it is cheap, and it is the proof that what serves is right).

Each stage's outcome, reason and timing go into `<state_dir>/pipeline/runs/<run_id>.json`
(rewritten after every stage). A failed stage stops the stages after it; every job publishes
atomically (app/artifacts.py, the feature alias), so what was serving before keeps serving.
The exit code is 1 when a stage failed. `flags.trending_detection: false` skips the trending
job. The last stdout line is the run manifest as one JSON object.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Callable, Mapping

from app.artifacts import ArtifactStore, new_version
from app.config import Settings
from app.pipeline_state import PipelineState, RunManifest, StageRecord, file_digest, files_fingerprint, fingerprint
from jobs.common import event_files

log = logging.getLogger(__name__)

BATCH_JOBS = ("content", "cf", "trending")
"""The parallel stage; each name is also the artifact the job publishes."""
STAGES = ("export", *BATCH_JOBS, "materialize", "parity")

Job = Callable[[Settings], dict]


def default_jobs() -> dict[str, Job]:
    from jobs.embed_content import embed_content
    from jobs.export_events import export_events
    from jobs.materialize import materialize
    from jobs.parity_check import parity_check
    from jobs.train_cf import train_cf
    from jobs.trending import detect_trending

    return {
        "export": export_events, "content": embed_content, "cf": train_cf, "trending": detect_trending,
        "materialize": materialize, "parity": parity_check,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _call(job: Job, settings: Settings) -> dict:
    """Run a job and time it where it runs (in a Ray task for the batch jobs)."""
    started_at, t0 = _now(), time.perf_counter()
    summary = job(settings)
    return {"summary": summary, "seconds": round(time.perf_counter() - t0, 3), "started_at": started_at}


def _error(exc: BaseException) -> str:
    """One line: a RayTaskError's text is the whole remote traceback."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"[:500]


def export_pending(client, settings: Settings) -> tuple[bool, str]:
    """Whether the stream holds entries the export has not made durable yet, and why."""
    import redis

    from app.events.stream import _parse_id
    from app.keys import Keys

    keys = Keys(settings.redis.key_prefix)
    if client.exists(keys.export_inflight()):
        return True, "an interrupted export chunk is in flight"
    cursor = (client.get(keys.export_cursor()) or b"0-0").decode()
    try:
        last = client.xinfo_stream(settings.redis.stream_key)["last-generated-id"]
    except redis.ResponseError:  # no stream yet
        return False, "the event stream is empty"
    last = last.decode() if isinstance(last, bytes) else last
    if _parse_id(last) > _parse_id(cursor):
        return True, f"stream entries after the export cursor {cursor} (last {last})"
    return False, f"no stream entry after the export cursor {cursor}"


def batch_fingerprints(settings: Settings, events_fp: str) -> dict[str, str]:
    from jobs.trending import catalogue_path
    from training.content import AUDIO_FEATURE_VERSION  # here: librosa is slow to import

    catalogue = catalogue_path(settings)  # both jobs read it: a new catalogue re-runs both
    return {
        # The feature version too: features defined differently need a new artifact, which
        # cold start insists on (training/cold_start.py), even when no input changed.
        "content": fingerprint(
            "content", events_fp, file_digest(catalogue), settings.content.model_dump(mode="json"), AUDIO_FEATURE_VERSION
        ),
        "cf": fingerprint("cf", events_fp, settings.cf.model_dump(mode="json")),
        "trending": fingerprint(
            "trending", events_fp, file_digest(catalogue), settings.trending.model_dump(mode="json")
        ),
    }


def materialize_fingerprint(settings: Settings, store: ArtifactStore, events_fp: str) -> str:
    repo = sorted(settings.features.repo_dir.glob("*.y*ml"))
    return fingerprint(
        "materialize",
        {name: store.latest_version(name) for name in BATCH_JOBS},
        events_fp,
        {p.name: file_digest(p) for p in repo},
        settings.features.model_dump(mode="json"),
        {k: settings.serving.model_dump(mode="json")[k] for k in ("recent_plays", "heard_filter_days")},
    )


def renewal_due(namespace: str, remaining_s: float | None, registry) -> str | None:
    """Why a namespace with nothing new to write must be written again anyway, or None. Its
    keys expire with their TTL, aliased or not, so a system that saw no new events for a month
    would lose every listener's features at once. It is rewritten once its first key to expire
    (`remaining_s` to go, as Redis counts it) has less than half the shortest view TTL left."""
    renew_s = min((v.ttl_s for v in registry.views.values()), default=None)
    if remaining_s is None or renew_s is None or remaining_s >= renew_s / 2:
        return None
    return f"namespace {namespace} has keys expiring in {remaining_s / 86400:.1f} days, under half its {renew_s / 86400:g}-day TTL: written again"


class Pipeline:
    """One run. `jobs` replaces any stage's function (tests inject a failing one)."""

    def __init__(self, settings: Settings, jobs: Mapping[str, Job] | None = None, force: bool = False):
        from app.features.store import RedisOnlineStore
        from app.keys import Keys
        from app.redis_server import connect

        self.settings = settings
        self.jobs = {**default_jobs(), **(jobs or {})}
        self.force = force
        self.client = connect(settings)
        self.online = RedisOnlineStore(self.client, Keys(settings.redis.key_prefix))
        self.store = ArtifactStore(settings.paths.artifacts_dir)
        root = settings.paths.state_dir / "pipeline"
        self.state = PipelineState(root)
        self.manifest = RunManifest(root, new_version(), list(STAGES), {"flags": settings.flags.model_dump(), "force": force})

    # -- bookkeeping -----------------------------------------------------------------------
    def _skip(self, stage: str, reason: str, fp: str | None = None) -> None:
        rec = self.manifest.stages[stage]
        rec.outcome, rec.reason, rec.fingerprint = "skipped", reason, fp
        log.info("%s skipped: %s", stage, reason)
        self.manifest.save()

    def _done(self, stage: str, result: dict | None, exc: BaseException | None, fp: str | None = None) -> bool:
        from deployments.metrics import record_job

        rec: StageRecord = self.manifest.stages[stage]
        rec.fingerprint = fp
        if exc is None:
            rec.outcome, rec.summary = "ok", result["summary"]
            rec.seconds, rec.started_at = result["seconds"], result["started_at"]
            log.info("%s ok in %.1fs", stage, rec.seconds)
        else:
            rec.outcome, rec.reason = "failed", _error(exc)
            log.error("%s failed: %s (the previously published version keeps serving)", stage, rec.reason)
        record_job(stage, rec.outcome, rec.seconds)
        self.manifest.save()
        return exc is None

    def _local(self, stage: str, fp: str | None = None) -> bool:
        try:
            result = _call(self.jobs[stage], self.settings)
        except Exception as exc:  # noqa: BLE001 - recorded in the manifest, the run stops
            return self._done(stage, None, exc, fp)
        return self._done(stage, result, None, fp)

    def _not_run(self, stages, reason: str) -> None:
        for stage in stages:
            rec = self.manifest.stages[stage]
            if rec.outcome == "not_run":
                rec.reason = reason
        self.manifest.save()

    # -- stages ----------------------------------------------------------------------------
    def export(self) -> bool:
        pending, why = export_pending(self.client, self.settings)
        if not pending and not self.force:
            self._skip("export", why)
            return True
        return self._local("export")

    def batch(self, events_fp: str) -> list[str]:
        """Run the batch jobs that are out of date as parallel Ray tasks; returns the failed ones."""
        import ray

        fps = batch_fingerprints(self.settings, events_fp)
        to_run = []
        for name in BATCH_JOBS:
            if name == "trending" and not self.settings.flags.trending_detection:
                self._skip(name, "flags.trending_detection is off")
            elif not self.force and self.state.is_current(name, fps[name], self.store.latest_version(name)):
                self._skip(name, f"inputs unchanged since version {self.store.latest_version(name)}", fps[name])
            else:
                to_run.append(name)
        # num_cpus=0: the Ray Data work inside each job takes the cores. A worker that dies is
        # retried (the job publishes atomically, so a half run leaves nothing behind); a job
        # that raises is not.
        remote = ray.remote(num_cpus=0, max_retries=2)(_call)
        refs = {name: remote.remote(self.jobs[name], self.settings) for name in to_run}
        failed = []
        for name, ref in refs.items():
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - RayTaskError or a lost worker: recorded
                self._done(name, None, exc, fps[name])
                failed.append(name)
                continue
            self._done(name, result, None, fps[name])
            self.state.record(name, fps[name], self.store.latest_version(name))
        return failed

    def materialize(self, events_fp: str) -> bool:
        fp = materialize_fingerprint(self.settings, self.store, events_fp)
        published = self.online.current()
        namespace = published.namespace if published else None
        if not self.force and self.state.is_current("materialize", fp, namespace):
            expiring = renewal_due(namespace, self.online.first_expiry_s(namespace), published.registry)
            if expiring is None:
                self._skip("materialize", f"artifacts and events unchanged since namespace {namespace}", fp)
                return True
            log.info("materialize: %s", expiring)
        if not self._local("materialize", fp):
            return False
        self.state.record("materialize", fp, self.manifest.stages["materialize"].summary.get("namespace"))
        return True

    def parity(self) -> bool:
        if not self._local("parity"):
            return False
        rec = self.manifest.stages["parity"]
        if rec.summary.get("mismatches", 0) > 0:
            rec.outcome, rec.reason = "failed", f"{rec.summary['mismatches']} of {rec.summary['values']} values differ online vs offline"
            self.manifest.save()
            return False
        return True

    def run(self) -> dict:
        self.manifest.save()
        if not self.export():
            self._not_run(STAGES[1:], "export failed")
            return self.manifest.finish()
        events_fp = files_fingerprint(event_files(self.settings.paths.events_dir))
        failed = self.batch(events_fp)
        if failed:
            self._not_run(("materialize", "parity"), f"batch job(s) failed: {', '.join(failed)}")
            return self.manifest.finish()
        if not self.materialize(events_fp):
            self._not_run(("parity",), "materialize failed")
            return self.manifest.finish()
        self.parity()
        return self.manifest.finish()


def run_pipeline(settings: Settings, jobs: Mapping[str, Job] | None = None, force: bool = False) -> dict:
    """Run once; returns the run manifest (`outcome` is `ok` or `failed`)."""
    return Pipeline(settings, jobs, force).run()


def main() -> None:
    import sys

    from jobs.common import init_ray, parse_args, print_summary

    def extra(parser):
        parser.add_argument("--force", action="store_true", help="Run every stage, even those that are up to date.")

    args, settings = parse_args(__doc__, extra)
    init_ray()
    report = run_pipeline(settings, force=args.force)
    for stage in report["stages"]:
        log.info("%-12s %-8s %6s  %s", stage["stage"], stage["outcome"], stage["seconds"] or "", stage["reason"] or "")
    print_summary(report)
    if report["outcome"] != "ok":
        sys.exit(1)


if __name__ == "__main__":
    main()
