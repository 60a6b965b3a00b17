#!/usr/bin/env bash
# One-shot GPU check: training (Ray Train vs a plain loop, NCCL + AMP) and scoring (the job vs a
# plain loop, GPU utilisation, the CPU decode ceiling) for Lite0, ResNet50 and EfficientNet-B0, on
# one GPU reached for a short time, in one command of ~5-8 minutes. Prints a markdown table for
# docs/benchmarks.md and writes it (plus the raw JSON) under $OUT when set.
#
#   bash benchmarks/gpu_check.sh --prepare   # here, once: Ray wheels -> .whl/, real-data subset -> .gpucheck/
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from the project root (carry .whl and .gpucheck)
#   bash benchmarks/gpu_check.sh --dry-run   # here: the whole script, tiny, on the CPU with ./.venv (a test runs it)
#
# The GPU machine has CUDA PyTorch, torchvision, timm, pyarrow and pandas, no Ray and no package
# index: Ray comes from the wheels that ../shared/tools/pack-ray-wheels.sh packs into .whl/
# (git-ignored), installed into /tmp, never into the system. Both folders are git-ignored and
# together stay under the 64 MiB the device tool carries. Other options go to
# `benchmarks/gpu_check.py run` (e.g. --budget-s 300, --backbones 1).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=run
args=()
for a in "$@"; do
  case "$a" in
    --prepare) mode=prepare ;;
    --dry-run) mode=dry ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) args+=("$a") ;;
  esac
done
subset=${GPU_CHECK_DATA:-.gpucheck}
whl=${GPU_CHECK_WHL:-.whl}
venv_py=${PYTHON:-.venv/bin/python}

# Ray from the packed wheels into a folder under /tmp, when $1 cannot import it (the GPU machine).
ensure_ray() {
  if "$1" -c 'import ray' 2>/dev/null; then return 0; fi
  [ -f "$whl/ray-slim.tar.xz" ] || { echo "no Ray for $1 and no $whl/: run --prepare and carry .whl" >&2; exit 1; }
  local site=${GPU_CHECK_SITE:-/tmp/gpucheck-site} t0
  t0=$(date +%s)
  mkdir -p "$site"
  tar -xJf "$whl/ray-slim.tar.xz" -C "$site"
  "$1" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$whl"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "Ray installed from $whl/ into $site in $(( $(date +%s) - t0 )) s"
}

case "$mode" in
prepare)
  [ -f .whl/ray-slim.tar.xz ] || bash ../shared/tools/pack-ray-wheels.sh
  "$venv_py" benchmarks/gpu_check.py prepare --out "$subset" ${args[@]+"${args[@]}"}
  total=$(du -sm .whl "$subset" | awk '{s += $1} END {print s}')
  echo "carry: .whl + $subset = ${total} MiB (limit 64)"
  [ "$total" -lt 64 ] || { echo "too large to carry: pick fewer images (--per-class-train)" >&2; exit 1; }
  echo "now, on the GPU machine: bash benchmarks/gpu_check.sh   (carry: .whl, $subset)"
  ;;
dry)
  # The same steps at tiny size, in one process: a generated sample instead of the real subset, 64 px,
  # the CPU (gpu_check.py dry: prepare on it, then run --dry-run).
  ensure_ray "$venv_py"  # with ./.venv a no-op; with PYTHON=a Ray-less python, the GPU machine's install path
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$venv_py" benchmarks/gpu_check.py dry ${OUT:+--out "$OUT"} ${args[@]+"${args[@]}"}
  ;;
run)
  py=${PYTHON:-python3}
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  [ -d "$subset/preprocessed" ] || { echo "no $subset/: run 'bash benchmarks/gpu_check.sh --prepare' first and carry it" >&2; exit 1; }
  # What the check imports; a missing one is named here, not in a traceback minutes later.
  "$py" - <<'EOF'
import importlib.util, sys
need = ["torch", "timm", "pyarrow", "pandas", "numpy", "PIL", "fsspec", "yaml", "safetensors"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("python", sys.version.split()[0], "; missing:", ", ".join(missing) or "none")
if importlib.util.find_spec("scipy") is None:  # only decoding JPEGs needs it: training still runs
    print("WARNING: no scipy here: the scoring sections (JPEG decode and crop) will fail and say so")
sys.exit(1 if missing else 0)
EOF
  ensure_ray "$py"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export RAY_DATA_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1
  "$py" benchmarks/gpu_check.py run --data "$subset" ${OUT:+--out "$OUT"} ${args[@]+"${args[@]}"}
  ;;
esac
