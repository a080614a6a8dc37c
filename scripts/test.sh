#!/usr/bin/env bash
# The test suite: set up, then run pytest (arguments go to pytest). Exits non-zero on any failure,
# including pytest's exit code 5 when no test was collected.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest "$@"
