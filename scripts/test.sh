#!/usr/bin/env bash
# Set up ./.venv with the dev extra and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export RAY_DATA_DISABLE_PROGRESS_BARS=1
set +e
# Two processes, each taking whole modules (module-scoped fixtures are made once) in the order
# tests/fixtures/ray_session.py sets (not reordered by size); each has its own session fixtures (Ray,
# S3, servers, packages). TEST_WORKERS=0, or `-n 0` after the script's name, runs in this process.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests: the suite is missing, which is a failure" >&2
  exit 1
fi
exit "$rc"
