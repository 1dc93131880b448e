"""Where did the work run? Reads a cluster's state API and Prometheus endpoints after
scripts/multinode.sh has run the pipeline and the Serve app, and prints per node: the
pipeline's tasks and actors, the Serve replicas, and EchoTune's metrics. The last line is
one JSON object.

    python scripts/multinode_report.py --dashboard http://127.0.0.1:8265 --api http://127.0.0.1:8000 \
        --metrics 127.0.0.1:8080 127.0.0.1:8081 --state ~/.echotune
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter, defaultdict

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dashboard", required=True)
    parser.add_argument("--api", required=True)
    parser.add_argument("--metrics", nargs="+", required=True, help="host:port of each node's metrics export port")
    parser.add_argument("--state", required=True, help="state_dir: the pipeline's run manifests")
    args = parser.parse_args()

    from ray.util.state import list_actors, list_nodes, list_tasks

    from app.pipeline_state import latest_run

    nodes = {n.node_id: ("head" if n.is_head_node else "worker") + f" {n.node_ip}" for n in list_nodes(address=args.dashboard)}
    tasks = list_tasks(address=args.dashboard, limit=10_000, raise_on_missing_output=False)
    per_node = defaultdict(Counter)
    for t in tasks:
        if t.node_id:
            per_node[nodes.get(t.node_id, t.node_id)][t.name.split(".")[-1][:40]] += 1
    print("tasks and actor calls per node (top 6 names):")
    for node, names in sorted(per_node.items()):
        print(f"  {node}: {sum(names.values())} in all; " + ", ".join(f"{n} x{c}" for n, c in names.most_common(6)))

    actors = list_actors(address=args.dashboard, filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    replicas = defaultdict(list)
    for a in actors:
        if a.class_name.startswith("ServeReplica:echotune:"):
            replicas[nodes.get(a.node_id, a.node_id)].append(a.class_name.split(":")[-1])
    print("Serve replicas per node:")
    for node, names in sorted(replicas.items()):
        print(f"  {node}: {sorted(names)}")

    import pandas as pd

    user = pd.read_parquet(f"{args.state}/world/events.parquet", columns=["user_id"])["user_id"].iloc[0]
    for _ in range(10):  # a little traffic for the latency histograms
        rec = httpx.get(f"{args.api}/v1/users/{user}/recommendations", params={"k": 5}, timeout=60)
    time.sleep(12)  # replicas push their metrics to the node's agent every few seconds
    print(f"GET recommendations: {rec.status_code}, sources {[i['sources'] for i in rec.json().get('items', [])][:3]}")

    series = {}
    for endpoint in args.metrics:
        text = httpx.get(f"http://{endpoint}/metrics", timeout=30).text
        names = sorted({m.group(1) for m in re.finditer(r"^(ray_echotune_[a-z_]+?)(?:_bucket|_count|_sum)?\{", text, re.M)})
        series[endpoint] = names
        print(f"EchoTune metrics at http://{endpoint}/metrics: {names}")
        routes = sorted(set(re.findall(r'^ray_echotune_request_latency_ms_count\{.*?route="([^"]+)"', text, re.M)))
        if routes:
            print(f"  request latency routes: {routes}")

    run = latest_run(f"{args.state}/pipeline") or {}
    summary = {
        "nodes": len(nodes),
        "nodes_with_tasks": len(per_node),
        "nodes_with_replicas": len(replicas),
        "replicas": {node: len(v) for node, v in replicas.items()},
        "pipeline_last_run": {s["stage"]: s["outcome"] for s in run.get("stages", [])},
        "recommendations_status": rec.status_code,
        "echotune_metrics": sorted({n for names in series.values() for n in names}),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
