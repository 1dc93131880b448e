"""Evaluate an experiment from the event Parquet; report, decide, and roll back on a critical breach.

    ray job submit --working-dir . -- python -m jobs.evaluate_experiment --config ray_config.yaml --experiment NAME

Two Ray Data passes over `events/date=*/`, a map_batches task per piece of Parquet (about
`rows_per_task` rows of whole row groups, app/parquet_pieces.py): the first finds the exposed
users (impressions of the experiment, first exposure per user), the second sums every exposed
user's events into mergeable per-user partials (app/experiments/metrics.py: dense per-user
arrays from np.bincount over dictionary codes), one per task, merged on the driver; no
groupby shuffle. The statistics, guardrails and decision are plain functions
(app/experiments/). The report goes to
`<state_dir>/reports/experiments/<name>/<timestamp>/report.{json,html}`; with
`experiments.auto_rollback`, a critical breach sets the variant's kill switch in Redis.
Events count until the experiment's stop or their variant's kill; a variant killed before is
reported up to its kill and not decided on again.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from app.config import Settings
from app.experiments.definitions import Experiment
from app.experiments.evaluation import evaluate
from app.experiments.guardrails import decide
from app.experiments.metrics import DAY_MS, MetricsAccumulator, UserMetrics, attribution_ends, combine_exposures, exposures_in_parquet, merge_partials
from app.experiments.registry import ExperimentRegistry
from app.experiments.report import report_html, report_json
from app.parquet_pieces import item_parts, plan_items, read_plan

log = logging.getLogger(__name__)


def _exposure_pieces(pieces: pa.Table, experiment: str) -> pa.Table:
    """One task's pieces of Parquet to its exposed (user, variant) pairs."""
    frames = [exposures_in_parquet(path, groups, experiment) for path, groups in item_parts(pieces)]
    return pa.Table.from_pandas(pd.concat(frames, ignore_index=True), preserve_index=False)


def _metrics_pieces(pieces: pa.Table, accumulator: MetricsAccumulator) -> pa.Table:
    """One task's pieces of Parquet to one partial, pickled into one row (numpy arrays and frames)."""
    partials = [accumulator.add_parquet(path, groups) for path, groups in item_parts(pieces)]
    return pa.table({"partial": pa.array([pickle.dumps(merge_partials(partials), protocol=5)], pa.binary())})


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
    paths: list[str],
    experiment: Experiment,
    catalogue: Path | None,
    pre_period_ms: int,
    cpus: float = 1.0,
    rows_per_task: int = 2_000_000,
    end_ms: dict[str, int] | None = None,
) -> UserMetrics:
    """`end_ms`: per variant, when its attribution window closes (`attribution_ends`)."""
    import ray

    # Tasks, not actors: nothing to set up per worker, and no actor start-up on small jobs.
    # Each task reads its own pieces (app/parquet_pieces.py) rather than via read_parquet, so
    # strings stay Parquet dictionary codes and only small partials leave the task.
    plan = read_plan(paths, rows_per_task)
    pieces = ray.data.from_items(plan_items(plan), override_num_blocks=max(len(plan), 1))
    exposure_frames = pieces.map_batches(
        _exposure_pieces, fn_kwargs={"experiment": experiment.name}, batch_format="pyarrow", batch_size=1, num_cpus=cpus
    ).to_pandas()
    exposures = combine_exposures([exposure_frames] if len(exposure_frames.columns) else [], [v.name for v in experiment.variants], end_ms)
    log.info("%d exposed users (%d in more than one variant, excluded)", exposures.n_users, exposures.conflicting_users)
    track_ids, genres = load_catalogue(catalogue)
    acc = MetricsAccumulator(exposures, experiment.name, track_ids, genres, pre_period_ms)
    partials = pieces.map_batches(_metrics_pieces, fn_kwargs={"accumulator": acc}, batch_format="pyarrow", batch_size=1, num_cpus=cpus)
    blobs = [blob for batch in partials.iter_batches(batch_format="pyarrow", batch_size=None) for blob in batch["partial"].to_pylist()]
    log.info("merging %d partials", len(blobs))
    return acc.finish(merge_partials([acc.empty()] + [pickle.loads(blob) for blob in blobs]))


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
    killed_at = registry.killed_at(experiment)
    ends = attribution_ends([v.name for v in experiment.variants], experiment.stopped_at_ms, killed_at)
    users = compute_user_metrics(paths, experiment, catalogue, pre_ms, end_ms=ends)
    evaluation = evaluate(users, experiment, cfg.alpha, cfg.correction, cfg.srm_p_value, killed=set(killed_at))
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
