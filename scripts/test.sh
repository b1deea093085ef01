#!/usr/bin/env bash
# Quick start, command two: set up for the tests (scripts/setup_tests.sh), lint, and run the
# whole test suite (the MiniLM end-to-end tests and samples/js's npm test included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_tests.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check lrt_deploy tests benchmarks samples
# Two workers, a file each (the machines have 2 cores; LRT_TEST_WORKERS=0 runs in one process).
.venv/bin/python -m pytest -n "${LRT_TEST_WORKERS:-2}" --dist loadfile "$@"
