#!/usr/bin/env bash
# Set up ./.venv and run the whole pipeline on the embedded default, on a local Ray:
# generated sample -> preprocess -> tune (smoke size: each trial a Ray Train run) -> score,
# all under ./demo. Ends with the leaderboard, the predictions' path and a few of their rows, and
# the paths of the HTML reports of the search and of the scoring output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
export RAY_DATA_DISABLE_PROGRESS_BARS=1
echo "== 1/3 preprocess: generated sample -> demo/preprocessed"
$py jobs/preprocess.py --image-size 64
echo "== 2/3 tune (smoke size) -> demo/runs/demo"
# The output and every sibling scoring writes beside it (_series, _explain, ._staging, ._lease.*).
rm -rf demo/runs/demo demo/predictions demo/predictions[._]*
$py jobs/tune.py --smoke-test --data demo/preprocessed --storage demo/runs --name demo
echo "== 3/3 score every file of demo/sample -> demo/predictions"
$py jobs/score.py --model demo/runs/demo/best_model --input demo/sample --output demo/predictions
$py - <<'PY'
import pandas as pd
print("\nleaderboard (demo/runs/demo/leaderboard.md):")
print(open("demo/runs/demo/leaderboard.md").read())
df = pd.read_parquet("demo/predictions")
print(f"\npredictions: demo/predictions ({len(df)} rows); a few of them:")
cols = ["path", "predicted_label", "prob_glioma", "prob_meningioma", "prob_no_tumor", "prob_pituitary", "status"]
with pd.option_context("display.width", 200, "display.max_colwidth", 60):
    print(df.sort_values("path")[cols].head(6).to_string(index=False))
PY
echo
echo "reports (open them in a browser): the search's, then the scoring output's"
for f in demo/runs/demo/report.html demo/predictions/_report.html; do
  [ -f "$f" ] || { echo "error: the demo did not write $f" >&2; exit 1; }
  echo "  $(pwd)/$f"
done
