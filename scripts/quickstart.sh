#!/usr/bin/env bash
# Quick start, command one: install what exporting needs (scripts/setup.sh), then LRT-compress
# the shipped all-MiniLM-L6-v2, export it for ONNX Runtime Mobile with int8 weights, and print
# the comparison with the dense model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/lrt-export all-MiniLM-L6-v2 --target mobile --budget 0.9 --factorize-embeddings --quantize int8 \
    -o out/all-MiniLM-L6-v2-mobile --force "$@"
