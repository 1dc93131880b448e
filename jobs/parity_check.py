"""Compare the online feature store with the offline snapshot of the published namespace.

    ray job submit --working-dir . -- python -m jobs.parity_check --config ray_config.yaml

Samples `features.parity_sample` entities per view and compares every field. A completed
materialisation must show a mismatch rate of exactly 0; the job exits non-zero otherwise
(or above `--max-rate`), so a pipeline can refuse to go on.
"""

from __future__ import annotations

import logging
import sys

from app.config import Settings
from app.features.offline import OfflineSnapshots
from app.features.parity import compare_view
from app.features.store import RedisOnlineStore
from app.keys import Keys
from app.redis_server import connect

log = logging.getLogger(__name__)


def parity_check(settings: Settings) -> dict:
    store = RedisOnlineStore(connect(settings), Keys(settings.redis.key_prefix))
    published = store.current()
    if published is None:
        raise RuntimeError("nothing is published in the online store yet: run jobs.materialize first")
    offline = OfflineSnapshots(settings.paths.features_dir)
    reports = []
    for view in published.registry.views.values():
        try:
            frame = offline.load(view, published.namespace)
        except FileNotFoundError:
            log.warning("no offline snapshot of %s for %s", view.key, published.namespace)
            continue
        reports.append(compare_view(store, published.namespace, view, frame, settings.features.parity_sample))
    values = sum(r["values"] for r in reports)
    mismatches = sum(r["mismatches"] for r in reports)
    return {
        "job": "parity_check",
        "namespace": published.namespace,
        "values": values,
        "mismatches": mismatches,
        "mismatch_rate": mismatches / values if values else 0.0,
        "views": reports,
    }


def main() -> None:
    from jobs.common import parse_args, print_summary

    def extra(parser):
        parser.add_argument("--max-rate", type=float, default=0.0, help="Highest acceptable mismatch rate.")

    args, settings = parse_args(__doc__, extra)
    report = parity_check(settings)
    print_summary(report)
    if report["mismatch_rate"] > args.max_rate:
        sys.exit(1)


if __name__ == "__main__":
    main()
