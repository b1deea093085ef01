"""lrt-deploy: low-rank transformers to ONNX Runtime bundles; the public API, loaded lazily."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "lrt_deploy.load",
    "LoadedModel": "lrt_deploy.load",
    "LowRankLinear": "lrt_deploy.nn",
    "LowRankEmbedding": "lrt_deploy.nn",
    "LowRankConfig": "lrt_deploy.config",
    "UniformRank": "lrt_deploy.config",
    "EnergyRank": "lrt_deploy.config",
    "BudgetRank": "lrt_deploy.config",
    "FidelityFloor": "lrt_deploy.config",
    "HealConfig": "lrt_deploy.config",
    "factorize_": "lrt_deploy.compress",
    "Target": "lrt_deploy.export.targets",
    "Float16": "lrt_deploy.quant.recipes",
    "DynamicInt8": "lrt_deploy.quant.recipes",
    "StaticInt8": "lrt_deploy.quant.recipes",
    "Int4WeightOnly": "lrt_deploy.quant.recipes",
    "Int8WeightOnly": "lrt_deploy.quant.recipes",
    "export_onnx": "lrt_deploy.export.onnx_export",
    "export_bundle": "lrt_deploy.pipeline",
    "BenchmarkSettings": "lrt_deploy.plan",
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
