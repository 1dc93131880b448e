"""CPU seconds of a benchmark and its local Ray cluster, for per-core figures that other
tenants' load on a shared machine does not inflate (wall time does). Imported by the
benchmark scripts, which run as `python benchmarks/<name>.py` (this folder is on sys.path).
Take the difference of two readings."""

from __future__ import annotations

import psutil


def cpu_seconds() -> float:
    """User + system CPU time of this process and every live descendant (a local Ray
    cluster's raylet, GCS and workers descend from the driver that started it), each with its
    reaped children's, so a worker that exited between two readings still counts (in its
    parent's children time)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, children_user, children_system
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:4])
        except psutil.Error:  # exited between listing and reading
            pass
    return total
