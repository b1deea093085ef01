#!/usr/bin/env bash
# Create .venv and install lrt-deploy with what exporting needs (the export and minilm extras).
# No npm, no browser, no qemu, no sudo: scripts/setup_tests.sh adds those for the tests.
# Pins come from constraints.txt (torch's CPU build: an unpinned torch would pull CUDA wheels).
# pip's output goes to .venv/setup.log and is shown only when the install fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PYTHON" --version)" >&2
    "$PYTHON" -m venv .venv
fi
echo "setup: installing lrt-deploy[export,minilm] with pinned dependencies (log: .venv/setup.log)" >&2
if ! { .venv/bin/python -m pip install --upgrade pip &&
       .venv/bin/python -m pip install -c constraints.txt -e ".[export,minilm]"; } \
        > .venv/setup.log 2>&1; then
    cat .venv/setup.log >&2
    echo "setup: pip install failed (full log above)" >&2
    exit 1
fi
