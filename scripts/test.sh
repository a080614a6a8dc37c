#!/usr/bin/env bash
# The test suite: set up, then run pytest (arguments go to pytest). Exits non-zero on any failure,
# including pytest's exit code 5 when no test was collected.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# the report test renders reports/report.html in headless Chromium (Debian's chromium package)
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
  echo "semiprune test setup: installing Debian package chromium (for the report test)" >&2
  apt_get() { if [ "$(id -u)" = 0 ]; then apt-get "$@"; else sudo -n apt-get "$@"; fi; }
  apt_get install -y -q chromium >/dev/null 2>&1 \
    || { apt_get update -q >/dev/null 2>&1 && apt_get install -y -q chromium >/dev/null 2>&1; } \
    || echo "semiprune test setup: could not install chromium; the report test will fail under CI" >&2
fi
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest "$@"
