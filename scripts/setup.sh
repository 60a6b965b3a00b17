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
# --dev: the tests drive Debian's chromium (the HTML reports; Playwright never downloads a browser
# here), a real PACS (orthanc with its DICOMweb plugin) and dcmtk's dsrdump/dcmdump (the DICOM
# objects of scoring). CHROMIUM, ORTHANC, ORTHANC_DICOMWEB, DSRDUMP and APT_GET name other commands
# or files (tests/report/test_reports.py checks this step with stubs).
if [ -n "$extra" ]; then
  need=()
  command -v "${CHROMIUM:-chromium}" >/dev/null 2>&1 || need+=(chromium)
  command -v "${ORTHANC:-/usr/sbin/Orthanc}" >/dev/null 2>&1 || need+=(orthanc)
  [ -f "${ORTHANC_DICOMWEB:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}" ] || need+=(orthanc-dicomweb)
  command -v "${DSRDUMP:-dsrdump}" >/dev/null 2>&1 || need+=(dcmtk)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      apt=${APT_GET:-apt-get}
      if ! { "$apt" update -qq && DEBIAN_FRONTEND=noninteractive "$apt" install -y -qq --no-install-recommends "${need[@]}"; } \
          >.venv/apt.log 2>&1; then
        tail -20 .venv/apt.log >&2
        echo "error: installing Debian's ${need[*]} failed (full log: .venv/apt.log); the tests need them" >&2
        exit 1
      fi
    else
      echo "error: the tests need Debian's ${need[*]}, which is not installed: run" \
        "'sudo apt-get install -y --no-install-recommends ${need[*]}', then this script again" >&2
      exit 1
    fi
  fi
fi
stamp=".venv/.installed$extra"
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# pip's and setuptools' chatter goes to a log, shown only if the install fails. pip byte-compiles
# what it installs, and that stays: with PYTHONDONTWRITEBYTECODE=1 (set on this machine and in CI)
# an install without it made every process and Ray worker compile torch, Ray and the rest again on
# each import (a test run slowed about 2.5x, 2026-12-07).
log=.venv/install.log
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".$extra"; } >"$log" 2>&1; then
  grep -v "WARNING: Location" "$log" | tail -40 >&2
  echo "error: installing the project into .venv failed (full log: $log)" >&2
  exit 1
fi
echo "$want" > "$stamp"
