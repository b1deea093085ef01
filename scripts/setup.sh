#!/usr/bin/env bash
# Create .venv and install lrt-deploy with everything the export path and the tests need.
# Pins come from constraints.txt (torch 2.13.0 CPU build: an unpinned torch would pull CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
