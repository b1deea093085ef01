"""The compression recipe, one call: (budget search) -> factorize -> (heal).

:func:`compress_model` factorizes a model in place and keeps a dense copy to compare with; the
choices it makes on data (the budget for a fidelity floor, the best healing step) are judged on
the last fifth of the calibration batches, never on the held-out test text.
:func:`lowrank_by_design` describes models built low-rank, which are not compressed further.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lrt_deploy.compress.config import LowRankConfig
from lrt_deploy.errors import LrtDeployError, UnsupportedOperationError

if TYPE_CHECKING:
    from lrt_deploy.compress.factorize import FactorizationResult
    from lrt_deploy.compress.heal import HealResult
    from lrt_deploy.compress.search import BudgetSearchResult
    from lrt_deploy.load import LoadedModel

__all__ = [
    "SELECTION_DATA",
    "CompressionOutcome",
    "check_compressible",
    "compress_model",
    "describe_config",
    "lowrank_by_design",
    "needs_calibration",
]

logger = logging.getLogger(__name__)

#: Where data-driven choices are judged (written to the manifest and the report).
SELECTION_DATA = "last fifth of the calibration batches"


@dataclass
class CompressionOutcome:
    """What :func:`compress_model` did.

    Attributes:
        factorization: Per-layer decisions and parameter counts.
        dense: The model as it was before factorizing (a deep copy), to compare with.
        config: The config factorized with (the searched budget filled in).
        budget_search: The fidelity-floor search, when one ran.
        healing: The distillation run, when one ran.
        heal_steps: Steps healing was asked for.
    """

    factorization: FactorizationResult
    dense: LoadedModel
    config: LowRankConfig
    budget_search: BudgetSearchResult | None = None
    healing: HealResult | None = None
    heal_steps: int = 0

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``lowrank`` section."""
        healing = None
        if self.healing is not None:
            result = self.healing
            healing = {
                "steps": self.heal_steps,
                "steps_run": result.steps_run,
                "best_step": result.best_step,
                "seconds": result.seconds,
                "selection_data": SELECTION_DATA,
                "before": {"mean_cosine": result.before_mean_cosine,
                           "worst_cosine": result.before_worst_cosine},
                "after": {"mean_cosine": result.after_mean_cosine,
                          "worst_cosine": result.after_worst_cosine},
                "stopped_early": result.stopped_early,
            }
        search = None
        if self.budget_search is not None:
            search = {**self.budget_search.to_dict(), "selection_data": SELECTION_DATA}
        return {
            "origin": "post-training factorization",
            "config": self.config.to_dict(),
            "layers": [d.to_dict() for d in self.factorization.layers],
            "params_before": self.factorization.params_before,
            "params_after": self.factorization.params_after,
            "budget_search": search,
            "healing": healing,
        }


def describe_config(config: LowRankConfig) -> str:
    """A short description of what a factorization config asks for, for progress and errors."""
    if config.policy == "budget":
        what = f"budget {config.budget:g} of the candidate parameters"
    elif config.policy == "energy":
        what = f"energy {config.energy:g} of each layer's spectrum"
    else:
        what = f"rank {config.rank}"
    embeddings = ", embeddings too" if config.factorize_embeddings else ""
    return f"{config.solver}, {what}{embeddings}"


def check_compressible(loaded: LoadedModel) -> None:
    """Raise :class:`UnsupportedOperationError` when ``loaded`` has no layers to swap."""
    if not loaded.can_compress:
        raise UnsupportedOperationError(
            f"--rank needs an nn.Module to factorize, but '{loaded.name}' is a "
            f"{loaded.format} graph whose layers cannot be swapped: export it without "
            "--rank, or load the original module (.pt with --trust-pickle, or a Hugging "
            "Face folder)"
        )


def needs_calibration(
    config: LowRankConfig, heal_steps: int = 0, fidelity_floor: float | None = None
) -> bool:
    """Whether :func:`compress_model` with these arguments reads calibration batches."""
    return config.solver == "asvd" or bool(heal_steps) or fidelity_floor is not None


def compress_model(
    loaded: LoadedModel,
    config: LowRankConfig,
    batches: list[dict[str, Any]],
    *,
    heal_steps: int = 0,
    fidelity_floor: float | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> CompressionOutcome:
    """Factorize ``loaded.module`` in place: search a budget, factorize, heal, as asked.

    Args:
        loaded: The model; its module is replaced layer by layer.
        config: Factorization settings (with ``fidelity_floor``, the budget is searched).
        batches: Calibration batches (needed when :func:`needs_calibration` says so).
        heal_steps: Distil towards the dense model for this many steps (keeps the best step).
        fidelity_floor: Search the smallest budget keeping this mean cosine to the dense model.
        progress: Called with a short line as each step starts.

    Returns:
        The :class:`CompressionOutcome`, with the dense copy to compare against.

    Raises:
        UnsupportedOperationError: The model is a graph whose layers cannot be swapped.
        LrtDeployError: Nothing would be saved, or too little calibration data.
    """
    from lrt_deploy.compress.factorize import factorize_
    from lrt_deploy.compress.search import search_budget

    check_compressible(loaded)
    dense = dataclasses.replace(loaded, module=copy.deepcopy(loaded.module))
    fit, select = _split(batches) if heal_steps or fidelity_floor is not None else (batches, [])
    solver_data = fit if config.solver == "asvd" else None
    search = None
    if fidelity_floor is not None:
        progress(f"searching the smallest budget with mean cosine >= {fidelity_floor}")
        search = search_budget(
            loaded.module, config, solver_data, select, fidelity_floor, progress=progress
        )
        config = dataclasses.replace(config, budget=search.budget)
    progress(f"factorizing ({describe_config(config)})")
    result = factorize_(loaded.module, config, calibration=solver_data)
    if not result.factorized:
        reasons = "; ".join(sorted({d.reason for d in result.kept_dense})[:3])
        raise LrtDeployError(
            f"{describe_config(config)} saves parameters in no layer ({reasons}): choose a "
            "smaller rank or budget, e.g. --rank 0.25"
        )
    logger.info(result.summary())
    healing = _heal(loaded, dense, fit, select, heal_steps, progress) if heal_steps else None
    return CompressionOutcome(result, dense, config, search, healing, heal_steps)


def _split(batches: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if len(batches) < 2:
        raise LrtDeployError(
            "--heal and --fidelity-floor need at least two calibration batches: give more "
            "calibration data"
        )
    split = max(1, len(batches) // 5)
    return batches[:-split], batches[-split:]


def _heal(
    loaded: LoadedModel, dense: LoadedModel, train: list[dict[str, Any]],
    select: list[dict[str, Any]], steps: int, progress: Callable[[str], None],
) -> HealResult:
    """Distil the factorized model towards the dense one on ``train``, keeping the step that
    does best on ``select``."""
    from lrt_deploy.compress.heal import heal_

    progress(f"healing: {steps} distillation steps on {len(train)} calibration batches")
    result = heal_(
        loaded.module, dense.module, train, steps=steps, eval_batches=select,
        hidden_modules=_block_names(loaded.module), progress=True,
    )
    progress(
        f"healing kept step {result.best_step}: calibration-split mean cosine "
        f"{result.before_mean_cosine:.4f} -> {result.after_mean_cosine:.4f}"
    )
    return result


def _block_names(module: Any) -> list[str]:
    """Names of the repeated blocks (the first ModuleList with several entries), whose outputs
    healing matches besides the final output."""
    import torch

    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1:
            return [f"{name}.{index}" for index in range(len(child))]
    return []


def lowrank_by_design(module: Any) -> list[dict[str, Any]]:
    """Low-rank units a model was built with, read from its modules or, for graphs whose
    module classes are gone (.pt2, TorchScript), from the shapes of its weights."""
    import torch

    from lrt_deploy.nn import lowrank_layers_in_weights, lowrank_rank

    if isinstance(module, torch.nn.Module) and not isinstance(module, torch.jit.ScriptModule):
        return [
            {
                "name": name,
                "rank": lowrank_rank(sub),
                "type": type(sub).__name__,
                "action": "low-rank by design",
            }
            for name, sub in module.named_modules()
            if lowrank_rank(sub) is not None
        ]
    state = module.state_dict() if callable(getattr(module, "state_dict", None)) else {}
    if isinstance(module, torch.export.ExportedProgram):
        state = dict(module.state_dict)
    return [{**layer, "action": "low-rank by design"} for layer in lowrank_layers_in_weights(state)]
