#!/usr/bin/env bash
# Collaborative filtering on a 16-core machine: MovieLens 100K quality (5 splits) and the
# Last.fm-360K-sized synthetic matrix at full size, `implicit` on all cores against our ALS in
# one process and on 1, 2, 4, 8 and 16 Ray workers. Needs the project venv with the `bench`
# extra (`.venv/bin/pip install -e '.[bench]'`). The last line of the output is one JSON object.
#
#     bash benchmarks/cf_16core.sh | tee cf-16core.log
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec .venv/bin/python -m benchmarks.cf --splits 5 --large-scale 1.0 --large-iterations 5 --workers 1 2 4 8 16 "$@"
