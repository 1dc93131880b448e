"""Shared entrypoint plumbing for `ray job submit` jobs: arguments, settings, Ray, logging."""

from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from app.config import Settings, load_settings

log = logging.getLogger(__name__)


def parse_args(description: str, extra=None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="ray_config.yaml", help="Serve config holding EchoTune's settings.")
    if extra:
        extra(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args, load_settings(args.config)


def init_ray() -> None:
    """Join the cluster the job was submitted to (RAY_ADDRESS), or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)


@contextmanager
def timed(stage: str) -> Iterator[dict]:
    info: dict = {"stage": stage}
    start = time.perf_counter()
    try:
        yield info
    finally:
        info["seconds"] = round(time.perf_counter() - start, 3)
        log.info("%s finished in %.1fs", stage, info["seconds"])


def dataset_in_blocks(frame, rows_per_block: int, max_blocks: int = 1000):
    """A Ray dataset of the pandas `frame` in blocks of about `rows_per_block` rows, so every
    task or actor of a bounded pool gets work (one block would go to one of them). At most
    `max_blocks`: plenty for any pool, without per-block overhead on a huge input.

    The blocks are made here and handed over as they are (`from_blocks`), with no task in
    the cluster. `repartition` is an all-to-all task, and `from_pandas` reads each block's
    schema in a task: both need a whole free CPU, which a small busy cluster may not have for
    a long while (the content job's second pass once waited in `from_pandas` while its first
    pass's actors still held their CPUs; `jobs.embed_content._analyse` says why they did)."""
    import ray

    frame = frame.reset_index(drop=True)
    size = max(rows_per_block, -(-len(frame) // max_blocks))
    return ray.data.from_blocks([frame.iloc[i : i + size] for i in range(0, len(frame), size)])


def print_summary(summary: dict) -> None:
    """The last line of a job's log: one JSON object, easy to find in the dashboard."""
    print(json.dumps(summary, default=str), flush=True)


def event_files(events_dir: Path) -> list[str]:
    return sorted(str(p) for p in events_dir.rglob("*.parquet"))
