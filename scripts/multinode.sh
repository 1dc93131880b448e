#!/usr/bin/env bash
# A real two-node Ray cluster on this machine: a head and a worker joined with
# `ray start --address`, each with its own --temp-dir and free ports, so nothing else running
# here (a demo, another cluster) is touched. Runs the pipeline (`ray job submit`) and the Serve
# app across both, prints where tasks and replicas ran and EchoTune's metrics from both nodes'
# Prometheus endpoints, then stops ONLY the processes it started (never `ray stop`, which
# would kill every Ray process on the machine).
#
#     scripts/multinode.sh            # about 3-6 minutes on 2 cores
#     KEEP=1 scripts/multinode.sh     # leave the cluster up; it prints how to stop it
#
# The last stdout line is one JSON object (see scripts/multinode_report.py).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
RAY="$ROOT/.venv/bin/ray"
SERVE="$ROOT/.venv/bin/serve"
WORK="$(mktemp -d /tmp/etmn.XXXXXX)"   # short: Ray's socket paths must stay under 107 chars
export RAY_AUTH_MODE=disabled          # loopback only; a shared cluster uses token auth
# Same machine, same checkout: every worker imports the project from here. On a real
# cluster the code comes from the image (deploy/rayservice.yaml) or a working_dir URI.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$ROOT/.venv/bin:$PATH"

port() { "$PY" -c 'from app.redis_server import free_port; print(free_port())'; }
GCS=$(port); DASH=$(port); HTTP=$(port); M_HEAD=$(port); M_WORKER=$(port)

stop_ours() {
  # Every process we started names $WORK on its command line (temp dirs, redis --dir).
  local pids
  for sig in TERM KILL; do
    pids=$(pgrep -f -- "$WORK" || true)
    [ -z "$pids" ] && break
    kill -s "$sig" $pids 2>/dev/null || true
    for _ in $(seq 1 20); do sleep 0.5; pgrep -f -- "$WORK" >/dev/null || break; done
  done
  echo "stopped every process under $WORK" >&2
}
if [ -z "${KEEP:-}" ]; then trap stop_ours EXIT; fi

echo "== redis-server" >&2
REDIS_PORT=$(port)
mkdir -p "$WORK/redis"
"$($PY -c 'from app.redis_server import find_redis_binary; print(find_redis_binary())')" \
  --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --save "" --appendonly no \
  --logfile "$WORK/redis/redis.log" --daemonize no >/dev/null 2>&1 &
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"

echo "== head node (GCS :$GCS, dashboard :$DASH, metrics :$M_HEAD)" >&2
"$RAY" start --head --port="$GCS" --num-cpus=1 --resources='{"echotune_head": 1}' \
  --temp-dir="$WORK/head" --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --include-dashboard=true \
  --metrics-export-port="$M_HEAD" --dashboard-agent-listen-port="$(port)" --dashboard-agent-grpc-port="$(port)" \
  --runtime-env-agent-port="$(port)" --ray-client-server-port="$(port)" \
  --object-store-memory=150000000 --disable-usage-stats >"$WORK/head.log" 2>&1

echo "== worker node joins with ray start --address=127.0.0.1:$GCS (metrics :$M_WORKER)" >&2
"$RAY" start --address="127.0.0.1:$GCS" --num-cpus=1 --resources='{"echotune_worker": 1}' \
  --temp-dir="$WORK/worker" --metrics-export-port="$M_WORKER" \
  --dashboard-agent-listen-port="$(port)" --dashboard-agent-grpc-port="$(port)" --runtime-env-agent-port="$(port)" \
  --object-store-memory=150000000 --disable-usage-stats >"$WORK/worker.log" 2>&1

echo "== config, tiny world, serve deploy" >&2
"$PY" - "$ROOT/ray_config.yaml" "$WORK" "$REDIS_URL" "$HTTP" <<'EOF'
import sys, yaml
src, work, redis_url, http = sys.argv[1:]
doc = yaml.safe_load(open(src))
doc["proxy_location"] = "HeadOnly"  # both nodes share one host: one proxy, one port
doc["http_options"]["port"] = int(http)
app = next(a for a in doc["applications"] if a["name"] == "echotune")
args = app["args"]
args["redis"]["url"] = redis_url
args["paths"]["state_dir"] = f"{work}/state"  # one host, so a "shared filesystem" for free
args["world"].update(n_users=80, n_artists=20, n_tracks=120, days=7, sessions_per_user=4.0, clip_seconds=1.0)
args["content"].update(concurrency=2, batch_size=20, embedding_dim=8, analysis_seconds=1.0)
args["cf"].update(factors=8, iterations=4, ray_workers=2, eval_fraction=0.0)
args["auth"]["enabled"] = False
args["serving"]["reload_interval_s"] = 2.0
for d in app["deployments"]:  # two replicas of the ranking stages, so they can land on both nodes
    if d["name"] in ("Blender", "Reranker", "FeatureFetcher"):
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 2
yaml.safe_dump(doc, open(f"{work}/config.yaml", "w"), sort_keys=False)
EOF
CFG="$WORK/config.yaml"
"$PY" -c "
from app.config import load_settings; from app.data.world import generate_world
s = load_settings('$CFG'); generate_world(s.world, s.paths.world_dir)"
"$SERVE" deploy "$CFG" --address "http://127.0.0.1:$DASH" >&2
API="http://127.0.0.1:$HTTP"
for _ in $(seq 1 240); do curl -sf "$API/healthz" >/dev/null && break; sleep 1; done

echo "== POST the world's events over HTTP" >&2
"$PY" - "$CFG" "$API" <<'EOF'
import sys, httpx
from app.config import load_settings
from app.data.world import load_world
s = load_settings(sys.argv[1]); world = load_world(s.paths.world_dir)
ev = world.events[["event_id", "user_id", "track_id", "event_type", "timestamp"]].copy()
ev["timestamp"] = ev["timestamp"].map(lambda t: t.isoformat())
rows, accepted = ev.to_dict("records"), 0
for i in range(0, len(rows), 1000):
    r = httpx.post(f"{sys.argv[2]}/v1/events", json={"events": rows[i:i + 1000]}, timeout=60)
    r.raise_for_status(); accepted += r.json()["accepted"]
print(f"accepted {accepted} of {len(rows)} events", file=sys.stderr)
EOF

echo "== ray job submit -- python -m jobs.pipeline (twice: the second run finds all up to date)" >&2
for run in 1 2; do
  "$RAY" job submit --address "http://127.0.0.1:$DASH" -- python -m jobs.pipeline --config "$CFG" >"$WORK/pipeline-$run.log" 2>&1 \
    || { tail -40 "$WORK/pipeline-$run.log" >&2; exit 1; }
  echo "-- pipeline run $run:" >&2
  grep -E "__main__: (export|content|cf|trending|materialize|parity) {2,}(ok|skipped|failed|not_run)" "$WORK/pipeline-$run.log" \
    | sed 's/^.*__main__: /   /' >&2 || true
done

sleep 3  # replicas reload the new versions; metrics reach the agents
"$PY" "$ROOT/scripts/multinode_report.py" --dashboard "http://127.0.0.1:$DASH" --api "$API" \
  --metrics "127.0.0.1:$M_HEAD" "127.0.0.1:$M_WORKER" --state "$WORK/state"

if [ -n "${KEEP:-}" ]; then
  echo "cluster left running; stop it with: pgrep -f -- $WORK | xargs kill" >&2
fi
