"""Evaluate an experiment from the event Parquet; report, decide, and roll back on a critical breach.

    ray job submit --working-dir . -- python -m jobs.evaluate_experiment --config ray_config.yaml --experiment NAME

Two Ray Data passes over `events/date=*/`: the first finds the exposed users (impressions of
the experiment, first exposure per user), the second sums every exposed user's events into
mergeable per-user partials (app/experiments/metrics.py), one per block, merged on the
driver. The statistics, guardrails and decision are plain functions (app/experiments/). The
report goes to `<state_dir>/reports/experiments/<name>/<timestamp>/report.{json,html}`; with
`experiments.auto_rollback`, a critical breach sets the variant's kill switch in Redis.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from app.config import Settings
from app.experiments.definitions import Experiment
from app.experiments.evaluation import evaluate
from app.experiments.guardrails import decide
from app.experiments.metrics import DAY_MS, EVENT_COLUMNS, EXPOSURE_COLUMNS, Exposures, MetricsAccumulator, UserMetrics, combine_exposures, exposure_partial
from app.experiments.registry import ExperimentRegistry
from app.experiments.report import report_html, report_json

log = logging.getLogger(__name__)


def _exposure_batch(batch: pa.Table, experiment: str):
    return exposure_partial(batch, experiment)


def _metrics_batch(batch: pa.Table, exposures: Exposures, experiment: str, track_ids, track_genres, pre_period_ms: int) -> pa.Table:
    """One block's partial sums, pickled into one row (they are numpy arrays and frames)."""
    acc = MetricsAccumulator(exposures, experiment, track_ids, track_genres, pre_period_ms)
    return pa.table({"partial": pa.array([pickle.dumps(acc.add(batch), protocol=5)], pa.binary())})


def load_catalogue(path: Path | None) -> tuple[pa.Array | None, object]:
    """Track ids and a genre index per track, for diversity and coverage."""
    if path is None or not Path(path).exists():
        return None, None
    import pyarrow.compute as pc

    t = pq.read_table(path, columns=["track_id", "genre"])
    genre = pc.dictionary_encode(t["genre"].combine_chunks()).indices.fill_null(0).to_numpy(zero_copy_only=False)
    return t["track_id"].combine_chunks(), genre.astype("int64")


def event_paths(events_dir: Path, since_ms: int | None) -> list[str]:
    """Parquet files of the date partitions from `since_ms`'s day on (all when None)."""
    files = sorted(events_dir.rglob("*.parquet"))
    if since_ms is None:
        return [str(p) for p in files]
    since = time.strftime("%Y-%m-%d", time.gmtime(since_ms / 1000))
    return [str(p) for p in files if not p.parent.name.startswith("date=") or p.parent.name[5:] >= since]


def compute_user_metrics(
    paths: list[str], experiment: Experiment, catalogue: Path | None, pre_period_ms: int, cpus: float = 0.5
) -> UserMetrics:
    import ray

    # Tasks, not actors: nothing to set up per worker, and no actor start-up on small jobs.
    exposure_frames = (
        ray.data.read_parquet(paths, columns=EXPOSURE_COLUMNS)
        .map_batches(_exposure_batch, fn_kwargs={"experiment": experiment.name}, batch_format="pyarrow", batch_size=None, num_cpus=cpus)
        .to_pandas()
    )
    exposures = combine_exposures([exposure_frames], [v.name for v in experiment.variants])
    log.info("%d exposed users (%d in more than one variant, excluded)", exposures.n_users, exposures.conflicting_users)
    track_ids, genres = load_catalogue(catalogue)
    acc = MetricsAccumulator(exposures, experiment.name, track_ids, genres, pre_period_ms)
    shared = {"exposures": exposures, "track_ids": track_ids, "track_genres": genres}
    partials = ray.data.read_parquet(paths, columns=EVENT_COLUMNS).map_batches(
        _metrics_batch,
        fn_kwargs={**shared, "experiment": experiment.name, "pre_period_ms": pre_period_ms},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=cpus,
    )
    total = acc.empty()
    for i, batch in enumerate(partials.iter_batches(batch_format="pyarrow", batch_size=None)):
        for blob in batch["partial"].to_pylist():
            total = total.merge(pickle.loads(blob))
        log.info("merged partial %d", i + 1)
    return acc.finish(total)


def write_report(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_text(json.dumps(doc, indent=2, default=str))
    html_path.write_text(report_html(doc))
    return json_path, html_path


def evaluate_experiment(
    settings: Settings,
    name: str,
    registry: ExperimentRegistry,
    events_dir: Path | None = None,
    catalogue: Path | None = None,
    out_dir: Path | None = None,
) -> dict:
    if not settings.flags.experiment_evaluation:  # nothing read, nothing rolled back
        log.warning("experiment evaluation is off (flags.experiment_evaluation): %s not evaluated", name)
        return {"job": "evaluate_experiment", "experiment": name, "skipped": "flags.experiment_evaluation is off", "rolled_back": []}
    started = time.perf_counter()
    cfg = settings.experiments
    experiment = registry.get(name)
    pre_ms = int(cfg.pre_period_days * DAY_MS)
    since = experiment.started_at_ms - pre_ms if experiment.started_at_ms else None
    paths = event_paths(events_dir or settings.paths.events_dir, since)
    if not paths:
        raise FileNotFoundError(f"no event Parquet under {events_dir or settings.paths.events_dir}")
    if catalogue is None:
        catalogue = settings.paths.world_dir / "tracks.parquet"
    users = compute_user_metrics(paths, experiment, catalogue, pre_ms)
    evaluation = evaluate(users, experiment, cfg.alpha, cfg.correction, cfg.srm_p_value)
    decisions = decide(evaluation, experiment)
    rolled_back = []
    for d in decisions:
        log.info("%s: %s", d.variant, d.recommendation)
        if d.rollback and cfg.auto_rollback:
            registry.kill(name, d.variant, d.recommendation)
            rolled_back.append(d.variant)
    doc = report_json(evaluation, decisions, users, {"rolled_back": rolled_back, "files": len(paths)})
    out_dir = out_dir or settings.paths.state_dir / "reports" / "experiments" / name / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    json_path, html_path = write_report(doc, out_dir)
    log.info("report: file://%s (JSON: %s)", html_path, json_path)
    return {
        "job": "evaluate_experiment",
        "experiment": name,
        "users": evaluation.users,
        "decisions": {d.variant: d.action for d in decisions},
        "rolled_back": rolled_back,
        "report_html": str(html_path),
        "report_json": str(json_path),
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    from app.keys import Keys
    from app.redis_server import connect
    from jobs.common import init_ray, parse_args, print_summary

    def extra(parser):
        parser.add_argument("--experiment", required=True, help="Name of the experiment to evaluate.")
        parser.add_argument("--catalogue", type=Path, default=None, help="Parquet with track_id, genre (default: the world's tracks).")

    args, settings = parse_args(__doc__, extra)
    init_ray()
    registry = ExperimentRegistry(connect(settings), Keys(settings.redis.key_prefix))
    print_summary(evaluate_experiment(settings, args.experiment, registry, catalogue=args.catalogue))


if __name__ == "__main__":
    main()
