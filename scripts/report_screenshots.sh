#!/usr/bin/env bash
# Regenerate the report screenshots the docs show (docs/report_scoring.png, docs/report_training.png):
# tests/report/test_reports.py opens its pages in headless Chromium and saves each screenshot into
# $BRAINTUMOR_SCREENSHOT_DIR too. Usage: bash scripts/report_screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
BRAINTUMOR_SCREENSHOT_DIR="$out" .venv/bin/python -m pytest tests/report/test_reports.py -q -p no:logging \
  -k "scoring_report_in_the_browser or training_report_in_the_browser" >"$out/pytest.log" 2>&1 || {
  tail -40 "$out/pytest.log" >&2
  echo "error: the report tests failed; no screenshot was replaced" >&2
  exit 1
}
cp "$out/report_scoring.png" docs/report_scoring.png
cp "$out/report_training.png" docs/report_training.png
echo "wrote docs/report_scoring.png and docs/report_training.png"
