#!/usr/bin/env bash
# Audio feature extraction on a 16-core machine: scaling of the Ray Data actor pool from 1 to 16
# actors on the real labelled clips, the plain single-process loop as the peer, and the content
# job on the Warzone 2100 soundtrack. Needs the project venv (`make test` creates it), PyPI for
# the clips and apt for the Debian package. The last line of the output is one JSON object.
#
#     bash benchmarks/audio_16core.sh | tee audio-16core.log
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
# 28 clips x 12 = 336 clips: enough batches for 16 actors to reach a steady state.
exec .venv/bin/python -m benchmarks.audio --concurrency 1 2 4 8 16 --repeat 12 --batch-size 4 --debian "$@"
