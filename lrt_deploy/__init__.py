"""lrt-deploy: take low-rank (LRT) transformers to ONNX Runtime on desktop and mobile.

The public API is re-exported here lazily, so ``import lrt_deploy.runtime`` in an app does not
pull in torch: names are imported from their stage package on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "lrt_deploy.load",
    "LoadedModel": "lrt_deploy.load",
    "LowRankLinear": "lrt_deploy.nn",
    "LowRankEmbedding": "lrt_deploy.nn",
    "LowRankConfig": "lrt_deploy.compress",
    "factorize_": "lrt_deploy.compress",
    "Target": "lrt_deploy.export.targets",
    "Float16": "lrt_deploy.quant.recipes",
    "DynamicInt8": "lrt_deploy.quant.recipes",
    "StaticInt8": "lrt_deploy.quant.recipes",
    "Int4WeightOnly": "lrt_deploy.quant.recipes",
    "Int8WeightOnly": "lrt_deploy.quant.recipes",
    "export_onnx": "lrt_deploy.export.onnx_export",
    "export_bundle": "lrt_deploy.pipeline",
    "BenchmarkSettings": "lrt_deploy.pipeline",
    "Session": "lrt_deploy.runtime",
    "LrtDeployError": "lrt_deploy.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lrt_deploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
