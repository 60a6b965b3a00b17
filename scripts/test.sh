#!/usr/bin/env bash
# Set up ./.venv with the dev extra and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export RAY_DATA_DISABLE_PROGRESS_BARS=1
set +e
# One process by default: on 2 cores two processes (TEST_WORKERS=2: pytest-xdist, whole modules in
# the order tests/fixtures/ray_session.py sets) took longer, 32 min 37 s against 28 min 0 s, each heavy
# Ray test 2-3x slower beside another (2026-12-07); a machine with more cores may gain.
workers=()
[ "${TEST_WORKERS:-0}" = 0 ] || workers=(-n "$TEST_WORKERS" --dist loadfile --no-loadscope-reorder)
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "${workers[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests: the suite is missing, which is a failure" >&2
  exit 1
fi
exit "$rc"
