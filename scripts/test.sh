#!/usr/bin/env bash
# Set up ./.venv with the dev extra and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export RAY_DATA_DISABLE_PROGRESS_BARS=1
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests: the suite is missing, which is a failure" >&2
  exit 1
fi
exit "$rc"
