"""Run the three batch jobs (content embeddings, CF training, trending) in parallel on Ray.

    ray job submit --working-dir . -- python -m jobs.batch --config ray_config.yaml

Each job is a Ray task that drives its own Ray Data pipeline; the tasks reserve no CPU
themselves so that the Ray Data work inside them gets the cluster's cores.
"""

from __future__ import annotations

import logging

from app.config import Settings

log = logging.getLogger(__name__)


def _run_job(name: str, settings: Settings) -> dict:
    from jobs.embed_content import embed_content
    from jobs.train_cf import train_cf
    from jobs.trending import detect_trending

    return {"content": embed_content, "cf": train_cf, "trending": detect_trending}[name](settings)


def run_parallel(settings: Settings, names: tuple[str, ...] = ("content", "cf", "trending")) -> dict[str, dict]:
    """Returns each job's summary; raises after all have finished if any failed."""
    import ray

    remote = ray.remote(num_cpus=0, max_retries=0)(_run_job)
    refs = {name: remote.remote(name, settings) for name in names}
    results, failures = {}, {}
    for name, ref in refs.items():
        try:
            results[name] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            failures[name] = exc
            log.error("batch job %s failed: %s", name, exc)
    if failures:
        raise RuntimeError(f"batch jobs failed: {sorted(failures)}; the previous versions stay published") from next(iter(failures.values()))
    return results


def main() -> None:
    from jobs.common import init_ray, parse_args, print_summary

    _, settings = parse_args(__doc__)
    init_ray()
    print_summary(run_parallel(settings))


if __name__ == "__main__":
    main()
