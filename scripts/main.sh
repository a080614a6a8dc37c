#!/usr/bin/env bash
# The main job: set up, then run the whole pipeline with params.yaml (arguments go to `semiprune run`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/semiprune run "$@"
