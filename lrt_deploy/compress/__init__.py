"""Compress a model by factorizing its layers into low-rank pairs.

Example:
    >>> result = factorize_(model, LowRankConfig(rank=0.25), calibration=batches)
    >>> print(result.summary())
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "FactorizationContext",
    "FactorizationResult",
    "InputCovarianceCollector",
    "LayerDecision",
    "LowRankConfig",
    "LowRankConfigError",
    "collect_input_covariances",
    "cosine_per_row",
    "embedding_factors",
    "embedding_fidelity",
    "factorize_",
    "max_abs_diff",
    "register_handler",
    "sqnr_db",
    "svd_factors",
    "top1_agreement",
    "whitened_svd_factors",
]

# Exports load on first access so that `lrt_deploy.compress.fidelity` (numpy only) and the
# config stay importable in runtime installs without torch.
_SUBMODULE_OF = {
    "FactorizationContext": "factorize",
    "FactorizationResult": "factorize",
    "InputCovarianceCollector": "calibration",
    "LayerDecision": "factorize",
    "LowRankConfig": "config",
    "LowRankConfigError": "config",
    "collect_input_covariances": "calibration",
    "cosine_per_row": "fidelity",
    "embedding_factors": "solvers",
    "embedding_fidelity": "fidelity",
    "factorize_": "factorize",
    "max_abs_diff": "fidelity",
    "register_handler": "factorize",
    "sqnr_db": "fidelity",
    "svd_factors": "solvers",
    "top1_agreement": "fidelity",
    "whitened_svd_factors": "solvers",
}


def __getattr__(name: str) -> Any:
    submodule = _SUBMODULE_OF.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
