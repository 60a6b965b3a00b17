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
# --dev: the report tests drive Debian's chromium (Playwright never downloads a browser here).
# CHROMIUM and APT_GET name other commands (tests/test_reports.py checks this step with stubs).
if [ -n "$extra" ] && ! command -v "${CHROMIUM:-chromium}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt=${APT_GET:-apt-get}
    if ! { "$apt" update -qq && DEBIAN_FRONTEND=noninteractive "$apt" install -y -qq --no-install-recommends chromium; } \
        >.venv/apt.log 2>&1; then
      tail -20 .venv/apt.log >&2
      echo "error: installing Debian's chromium failed (full log: .venv/apt.log); the report tests need it" >&2
      exit 1
    fi
  else
    echo "error: the report tests need Debian's chromium, which is not installed: run" \
      "'sudo apt-get install -y --no-install-recommends chromium', then this script again" >&2
    exit 1
  fi
fi
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
