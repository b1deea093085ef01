"""Compression: factorize layers into low-rank pairs, search budgets, heal; names load lazily."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BudgetSearchResult",
    "CompressionOutcome",
    "compress_model",
    "output_fidelity",
    "CalibrationStatistics",
    "EmbeddingIndexCounter",
    "FactorizationContext",
    "FactorizationResult",
    "HealResult",
    "Healer",
    "InputCovarianceCollector",
    "LayerDecision",
    "LowRankConfig",
    "LowRankConfigError",
    "RankChoice",
    "RankedLayer",
    "Spectrum",
    "budget_ranks",
    "collect_calibration_statistics",
    "collect_input_covariances",
    "cosine_per_row",
    "embedding_factors",
    "embedding_fidelity",
    "embedding_spectrum",
    "energy_ranks",
    "factorize_",
    "heal_",
    "kl_divergence",
    "search_budget",
    "max_abs_diff",
    "primary_output",
    "register_handler",
    "sqnr_db",
    "svd_factors",
    "svd_spectrum",
    "top1_agreement",
    "whitened_spectrum",
    "whitened_svd_factors",
]

# Exports load on first access so that `lrt_deploy.metrics` (numpy only) stays
# importable in runtime installs without torch.
_SUBMODULE_OF = {
    "CalibrationStatistics": "calibration",
    "EmbeddingIndexCounter": "calibration",
    "FactorizationContext": "handlers",
    "FactorizationResult": "factorize",
    "HealResult": "heal",
    "Healer": "heal",
    "InputCovarianceCollector": "calibration",
    "LayerDecision": "factorize",
    "LowRankConfig": "lrt_deploy.config.lowrank",
    "LowRankConfigError": "lrt_deploy.config.ranks",
    "RankChoice": "policies",
    "RankedLayer": "policies",
    "Spectrum": "solvers",
    "CompressionOutcome": "recipe",
    "compress_model": "recipe",
    "output_fidelity": "lrt_deploy.metrics",
    "budget_ranks": "policies",
    "collect_calibration_statistics": "calibration",
    "collect_input_covariances": "calibration",
    "cosine_per_row": "lrt_deploy.metrics",
    "embedding_factors": "solvers",
    "embedding_fidelity": "lrt_deploy.metrics",
    "embedding_spectrum": "solvers",
    "energy_ranks": "policies",
    "factorize_": "factorize",
    "heal_": "heal",
    "kl_divergence": "lrt_deploy.metrics",
    "search_budget": "search",
    "BudgetSearchResult": "search",
    "max_abs_diff": "lrt_deploy.metrics",
    "register_handler": "handlers",
    "primary_output": "calibration",
    "sqnr_db": "lrt_deploy.metrics",
    "svd_factors": "solvers",
    "svd_spectrum": "solvers",
    "top1_agreement": "lrt_deploy.metrics",
    "whitened_spectrum": "solvers",
    "whitened_svd_factors": "solvers",
}


def __getattr__(name: str) -> Any:
    submodule = _SUBMODULE_OF.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = submodule if "." in submodule else f"{__name__}.{submodule}"
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
