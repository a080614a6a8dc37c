#!/usr/bin/env bash
# Set up what semiprune needs, idempotently: a virtual environment in .venv with the pinned
# dependencies (re-installed only when pyproject.toml changes) and, where the machine allows it,
# the Fashion-MNIST files from Debian's dataset-fashion-mnist package.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$candidate; break
    fi
  done
fi
[ -n "$PY" ] || { echo "error: semiprune needs Python 3.11; install it (apt-get install python3.11 python3.11-venv) or set PYTHON=/path/to/python3.11" >&2; exit 2; }

stamp="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.semiprune-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "semiprune setup: creating .venv (about 2 minutes the first time)" >&2
  "$PY" -m venv .venv
  # torch first, pinned: a bare 'torch' requirement can resolve to a multi-GB CUDA build. Where the
  # machine offers no CPU wheel locally, point pip at one, e.g.
  # PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
  echo "$stamp" > .venv/.semiprune-stamp
fi

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -d data/fashion-mnist ]; then
  apt_get() { if [ "$(id -u)" = 0 ]; then apt-get "$@"; else sudo -n apt-get "$@"; fi; }
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    echo "semiprune setup: installing Debian package dataset-fashion-mnist" >&2
    apt_get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt_get update -q >/dev/null 2>&1 && apt_get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
      || echo "semiprune setup: could not install dataset-fashion-mnist; put the four IDX files in data/fashion-mnist/" >&2
  else
    echo "semiprune setup: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist' or put the four IDX files in data/fashion-mnist/" >&2
  fi
fi
