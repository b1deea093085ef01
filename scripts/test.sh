#!/usr/bin/env bash
# Quick start, command two: set up, lint, and run the whole test suite (the MiniLM end-to-end
# tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check lrt_deploy tests benchmarks samples
.venv/bin/python -m pytest "$@"
