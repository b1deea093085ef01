"""Budget for a fidelity floor: the smallest parameter budget whose factorized model still
reaches a required fidelity to the dense model on calibration data."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lrt_deploy.compress.calibration import primary_output
from lrt_deploy.compress.config import LowRankConfig, LowRankConfigError
from lrt_deploy.compress.factorize import FactorizationResult, factorize_
from lrt_deploy.compress.fidelity import cosine_per_row

__all__ = ["BudgetSearchResult", "search_budget"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]


@dataclass
class BudgetSearchResult:
    """Outcome of :func:`search_budget`.

    Attributes:
        floor: The required mean cosine to the dense model's primary output.
        budget: The smallest tried budget that met the floor.
        mean_cosine: Its mean cosine on the selection batches.
        trials: Every budget tried with its mean cosine and parameters kept, in order.
    """

    floor: float
    budget: float
    mean_cosine: float
    trials: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _mean_cosine(model: nn.Module, references: list[np.ndarray], batches: Sequence[Batch]) -> float:
    values = []
    with torch.no_grad():
        for batch, reference in zip(batches, references, strict=True):
            output = primary_output(model(**batch)).detach().cpu().numpy()
            values.append(cosine_per_row(reference, output))
    return float(np.concatenate(values).mean())


def search_budget(
    model: nn.Module,
    config: LowRankConfig,
    calibration: Sequence[Batch] | None,
    selection: Sequence[Batch],
    floor: float,
    *,
    low: float = 0.3,
    high: float = 0.98,
    steps: int = 4,
    progress: Callable[[str], None] | None = None,
) -> BudgetSearchResult:
    """Bisect the ``policy="budget"`` parameter budget for the smallest one whose factorized
    model keeps a mean cosine of at least ``floor`` to ``model`` on ``selection``.

    Each trial factorizes a deep copy, so ``model`` is not modified. Fidelity rises with the
    budget in practice (more parameters, less truncation), which bisection relies on; every
    trial is recorded so the report can show the curve.

    Args:
        model: The dense model.
        config: A budget config (its ``budget`` is replaced by each trial's).
        calibration: Calibration batches for the factorization (``asvd``/output gains).
        selection: Batches fidelity is judged on; keep them apart from held-out test data.
        floor: Required mean cosine in (0, 1).
        low: Smallest budget tried.
        high: Largest budget tried; if it misses the floor, no budget is returned.
        steps: Bisection steps after the first trial at ``high``.
        progress: Called with a line per trial.

    Returns:
        The chosen budget and all trials.

    Raises:
        LowRankConfigError: Invalid floor, or even ``high`` misses the floor.
    """
    if config.policy != "budget":
        raise LowRankConfigError("search_budget needs a config with policy='budget'")
    if not 0.0 < floor < 1.0:
        raise LowRankConfigError(f"the fidelity floor must be a fraction in (0, 1), got {floor}")
    with torch.no_grad():
        references = [primary_output(model(**b)).detach().cpu().numpy() for b in selection]
    trials: list[dict[str, float]] = []

    def trial(budget: float) -> float:
        candidate = copy.deepcopy(model)
        result: FactorizationResult = factorize_(
            candidate, dataclasses.replace(config, budget=budget), calibration=calibration
        )
        score = _mean_cosine(candidate, references, selection)
        trials.append({"budget": budget, "mean_cosine": score,
                       "params_after": float(result.params_after),
                       "params_before": float(result.params_before)})
        if progress is not None:
            progress(f"budget {budget:.3f}: mean cosine {score:.4f} (floor {floor})")
        return score

    best_score = trial(high)
    if best_score < floor:
        raise LowRankConfigError(
            f"even a budget of {high} keeps only mean cosine {best_score:.4f} < {floor} on the "
            "calibration data: lower --fidelity-floor or export the dense model"
        )
    best, lo, hi = high, low, high
    for _ in range(steps):
        middle = (lo + hi) / 2
        score = trial(middle)
        if score >= floor:
            best, best_score, hi = middle, score, middle
        else:
            lo = middle
    logger.info("fidelity floor %.4f: budget %.3f (mean cosine %.4f)", floor, best, best_score)
    return BudgetSearchResult(floor=floor, budget=best, mean_cosine=best_score, trials=trials)
