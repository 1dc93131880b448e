"""Where a recommendation request's time goes: each stage's own work against the hops between
stages, for the EchoTune app and the bare chain of benchmarks/serve.py side by side.

    .venv/bin/python benchmarks/serve_trace.py [--requests 200] [--rounds 3]

serve.py measures the gap between the chains; this splits it. Requests go one at a time
(no queueing), each chain in turn, and every stage stamps the wall clock when its method
starts and ends (one machine, one clock for all processes). A request's time is then cut
into: the ingress and the hop to the fetch, the fetch's work, the hop to each retriever, their
work, the hop to the blend, its work, the hop to the re-rank, its work, and the way back out.
The bare chain's stages do no work, so its segments are Serve's own cost; ours minus its are
what our stages add in work and in moving their results.

Last, the same five stages run in this process, without Serve, on the same requests back to
back (warm caches): the work's floor, against which the work measured inside the replicas
shows what cold caches on a 2-core machine shared by a dozen processes add.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # noqa: E402  benchmarks/serve.py: the same set-up, world and bare chain

SEGMENTS = (
    "in_to_fetch", "fetch", "to_cf", "cf", "to_content", "content", "to_blend", "blend", "to_rerank", "rerank", "out", "total",
)
HOPS = ("in_to_fetch", "to_cf", "to_blend", "to_rerank", "out")
WORK = ("fetch", "retrieve", "blend", "rerank")  # the critical path: the slower retriever counts


def stamped(cls: type, method: str) -> type:
    """`cls` whose `method` records (start, end) wall times, and a `stamps` method that hands
    them over and forgets them."""

    async def timed(self, *args, **kwargs):
        started = time.time()
        result = await getattr(cls, method)(self, *args, **kwargs)
        self.__dict__.setdefault("_stamps", []).append((started, time.time()))
        return result

    async def stamps(self):
        taken, self._stamps = self.__dict__.get("_stamps", []), []
        return taken

    return type(cls.__name__, (cls,), {method: functools.wraps(getattr(cls, method))(timed), "stamps": stamps})


STAGES = ("FeatureFetcher", "CFRetriever", "ContentRetriever", "Blender", "Reranker")
BARE_STAGES = ("BareFetch", "BareCF", "BareContent", "BareBlend", "BareRerank")


def stamped_app(settings):
    """deployments.app.wire with the five stages stamped."""
    from deployments.features import FeatureFetcher
    from deployments.gateway import EventGateway
    from deployments.ingress import ApiIngress
    from deployments.ranking import Blender, Reranker
    from deployments.retrieval import CFRetriever, ContentRetriever
    from deployments.trending import Trending

    def stage(deployment, method):
        return deployment.options(func_or_class=stamped(deployment.func_or_class, method)).bind(settings)

    return ApiIngress.bind(
        settings, EventGateway.bind(settings), stage(FeatureFetcher, "fetch"), stage(Blender, "blend"), stage(Reranker, "rerank"),
        Trending.bind(settings), cf_retriever=stage(CFRetriever, "retrieve"), content_retriever=stage(ContentRetriever, "retrieve"),
    )


def segments(sent: tuple[float, float], f, c, n, b, r) -> dict[str, float]:
    """One request's segments in ms, from the client's send/receive and each stage's stamps."""
    t0, t1 = sent
    cut = {
        "in_to_fetch": f[0] - t0, "fetch": f[1] - f[0], "to_cf": c[0] - f[1], "cf": c[1] - c[0], "to_content": n[0] - f[1],
        "content": n[1] - n[0], "to_blend": b[0] - max(c[1], n[1]), "blend": b[1] - b[0], "to_rerank": r[0] - b[1],
        "rerank": r[1] - r[0], "out": t1 - r[1], "total": t1 - t0,
    }
    return {k: v * 1000 for k, v in cut.items()}


def trace(url: str, handles: list, users: list[str], n: int) -> list[dict[str, float]]:
    import httpx

    for handle in handles:
        handle.stamps.remote().result()
    sent = []
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            t0 = time.time()
            client.get(url.format(user=users[i % len(users)])).raise_for_status()
            sent.append((t0, time.time()))
            time.sleep(0.02)  # requests one at a time, apart: the stages' work without queueing
    stamps = [handle.stamps.remote().result() for handle in handles]
    if any(len(s) != n for s in stamps):
        raise RuntimeError(f"expected {n} calls of every stage, got {[len(s) for s in stamps]}")
    return [segments(sent[i], *(s[i] for s in stamps)) for i in range(n)]


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    p50 = {k: statistics.median(r[k] for r in rows) for k in SEGMENTS}
    p50["retrieve"] = max(p50["cf"], p50["content"])
    p50["to_retrieve"] = max(p50["to_cf"], p50["to_content"])
    return p50


def in_process(settings, users: list[str], rounds: int) -> dict[str, float]:
    """The stages' work in this process, on requests back to back: median ms per stage."""
    from deployments.features import FeatureFetcher
    from deployments.ranking import Blender, Reranker
    from deployments.retrieval import CFRetriever, ContentRetriever

    fetcher, cf, content, blender, reranker = (
        d.func_or_class(settings) for d in (FeatureFetcher, CFRetriever, ContentRetriever, Blender, Reranker)
    )
    for stage in (cf, content, blender):
        stage.refresh()
    took: dict[str, list[float]] = {k: [] for k in ("fetch", "cf", "content", "blend", "rerank")}

    async def one(user: str) -> None:
        t = [time.perf_counter()]
        features = await fetcher.fetch([user]); t.append(time.perf_counter())
        c = await cf.retrieve(features, [None]); t.append(time.perf_counter())
        n = await content.retrieve(features, [None]); t.append(time.perf_counter())
        b = await blender.blend(features, c, n, [None]); t.append(time.perf_counter())
        await reranker.rerank(b, [20], ["trace"], [None]); t.append(time.perf_counter())
        for i, k in enumerate(took):
            took[k].append((t[i + 1] - t[i]) * 1000)

    async def run() -> None:
        for _ in range(rounds):
            for user in users:
                await one(user)

    asyncio.run(run())
    p50 = {k: statistics.median(v) for k, v in took.items()}
    p50["retrieve"] = max(p50["cf"], p50["content"])
    return p50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200, help="Requests per chain and round.")
    parser.add_argument("--rounds", type=int, default=3, help="Turns each chain takes (segments pooled).")
    parser.add_argument("--state", type=Path, default=Path(tempfile.gettempdir()) / "echotune-bench-serve")
    args = parser.parse_args()
    bench.load_test_env()

    import pandas as pd
    from ray import serve

    from app.config import settings_from_args

    with bench.local_system(args.state) as (_, port, app_args):
        settings = settings_from_args(app_args)
        logging_config = bench.serve_logging_config()
        serve.run(stamped_app(settings), name="echotune", route_prefix="/", logging_config=logging_config)
        bench.wait_http(f"http://127.0.0.1:{port}/healthz")
        bench.prepare(app_args, f"http://127.0.0.1:{port}")
        serve.run(bench.bare_chain_app(hop=stamped(bench.Relay, "__call__")), name="bare", route_prefix="/bare", logging_config=logging_config)
        users = pd.read_parquet(args.state / "world" / "users.parquet")["user_id"].tolist()
        bench.wait_http(f"http://127.0.0.1:{port}/bare/v1/users/{users[0]}/recommendations")
        chains = {
            "bare": (f"http://127.0.0.1:{port}/bare/v1/users/{{user}}/recommendations?k=20", [serve.get_deployment_handle(d, "bare") for d in BARE_STAGES]),
            "ours": (f"http://127.0.0.1:{port}/v1/users/{{user}}/recommendations?k=20", [serve.get_deployment_handle(d, "echotune") for d in STAGES]),
        }
        for url, handles in chains.values():
            trace(url, handles, users, 50)  # warm
        rows: dict[str, list] = {"bare": [], "ours": []}
        for round_ in range(args.rounds):
            for name, (url, handles) in chains.items():
                taken = trace(url, handles, users, args.requests)
                rows[name] += taken
                print(f"{name} round {round_}: " + "  ".join(f"{k} {v:.2f}" for k, v in medians(taken).items() if k in SEGMENTS), flush=True)
        local = in_process(settings, users, args.rounds)

    ours, bare = medians(rows["ours"]), medians(rows["bare"])
    summary = {
        "total_p50_ms": round(ours["total"], 2),
        "bare_total_p50_ms": round(bare["total"], 2),
        "gap_p50_ms": round(ours["total"] - bare["total"], 2),
        # Each stage's method, p50, inside its replica; the critical path takes the slower retriever.
        "work_p50_ms": {k: round(ours[k], 3) for k in ("fetch", "cf", "content", "blend", "rerank")},
        "critical_path_work_ms": round(sum(ours[k] for k in WORK), 2),
        # The same work in one process on requests back to back.
        "in_process_work_p50_ms": {k: round(v, 3) for k, v in local.items() if k != "retrieve"},
        "in_process_critical_path_work_ms": round(sum(local[k] for k in WORK), 2),
        # Hops and ingress: ours against the bare chain's (p50 of each segment).
        "hops_p50_ms": {k: round(ours[k], 2) for k in (*HOPS[:1], "to_retrieve", *HOPS[2:])},
        "bare_hops_p50_ms": {k: round(bare[k], 2) for k in (*HOPS[:1], "to_retrieve", *HOPS[2:])},
        "hops_gap_ms": round(sum(ours[k] - bare[k] for k in (*HOPS[:1], "to_retrieve", *HOPS[2:])), 2),
        "requests_per_chain": len(rows["ours"]),
    }
    print(f"p50 {summary['total_p50_ms']} ms against the bare chain's {summary['bare_total_p50_ms']}: "
          f"{summary['critical_path_work_ms']} ms of our stages' work on the critical path "
          f"({summary['in_process_critical_path_work_ms']} ms in one process, warm), hops {summary['hops_gap_ms']:+} ms")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
