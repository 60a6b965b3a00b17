#!/usr/bin/env bash
# Make ./.venv and install the project into it. Idempotent: a second run with an unchanged
# pyproject.toml does nothing. Usage: bash scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "error: Python >= 3.10 is needed ($py is $("$py" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2
  exit 2
}
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.installed$extra"
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# pip's and setuptools' chatter goes to a log, shown only if the install fails.
log=.venv/install.log
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".$extra"; } >"$log" 2>&1; then
  grep -v "WARNING: Location" "$log" | tail -40 >&2
  echo "error: installing the project into .venv failed (full log: $log)" >&2
  exit 1
fi
echo "$want" > "$stamp"
