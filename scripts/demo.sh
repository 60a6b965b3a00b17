#!/usr/bin/env bash
# Set up ./.venv and run the pipeline on the embedded default: a generated MRI-like sample
# under ./demo, a local Ray. Extra arguments go to jobs/preprocess.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python jobs/preprocess.py "$@"
