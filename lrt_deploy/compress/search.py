"""Budget for a fidelity floor: the smallest parameter budget whose factorized model still
reaches a required fidelity to the dense model, and the verdict on whether it kept it.

The budget is chosen on a calibration split. Text of another domain is usually further from the
dense model than the text ranks were chosen on, so the search measures that spread on a probe set
(the shipped different-domain held-out text) and asks the selection data for ``floor + margin``.
Whether the promise held is then judged on held-out figures by :func:`judge_floor`.
"""

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

__all__ = ["BudgetSearchResult", "FloorVerdict", "judge_floor", "search_budget"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]


@dataclass
class BudgetSearchResult:
    """Outcome of :func:`search_budget`.

    Attributes:
        floor: The required mean cosine to the dense model's primary output.
        budget: The smallest tried budget that met the floor.
        mean_cosine: Its mean cosine on the selection batches.
        trials: Every budget tried with its mean cosine (and ``probe_mean_cosine``) and
            parameters kept, in order.
        margin: What was added to the floor on the selection data: the largest drop measured
            from the selection data to the probe data over the trials (0 without a probe).
        target: ``floor + margin``, what the selection data had to reach.
        probe_mean_cosine: The chosen budget's mean cosine on the probe data.
        selection_data: What the selection batches were, for the report.
        probe_data: What the probe batches were, or None.
    """

    floor: float
    budget: float
    mean_cosine: float
    trials: list[dict[str, float]] = field(default_factory=list)
    margin: float = 0.0
    target: float = 0.0
    probe_mean_cosine: float | None = None
    selection_data: str = "selection batches"
    probe_data: str | None = None

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
    probe: Sequence[Batch] | None = None,
    selection_data: str = "selection batches",
    probe_data: str = "probe batches",
    max_margin: float = 0.05,
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
        probe: Batches of other text (e.g. the shipped different-domain held-out set) whose
            drop from ``selection`` sets the margin; judge the result on data outside both.
        selection_data: Name of the selection data, for the result.
        probe_data: Name of the probe data, for the result.
        max_margin: Cap on the margin, so a probe far off the selection data does not ask
            for more than any budget can give.

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
        probe_refs = [primary_output(model(**b)).detach().cpu().numpy() for b in probe or ()]
    trials: list[dict[str, float]] = []

    def margin() -> float:
        drops = [t["mean_cosine"] - t["probe_mean_cosine"] for t in trials
                 if "probe_mean_cosine" in t]
        return min(max_margin, max([0.0, *drops]))

    def trial(budget: float) -> dict[str, float]:
        candidate = copy.deepcopy(model)
        result: FactorizationResult = factorize_(
            candidate, dataclasses.replace(config, budget=budget), calibration=calibration
        )
        record = {"budget": budget, "mean_cosine": _mean_cosine(candidate, references, selection),
                  "params_after": float(result.params_after),
                  "params_before": float(result.params_before)}
        if probe:
            record["probe_mean_cosine"] = _mean_cosine(candidate, probe_refs, probe)
        trials.append(record)
        if progress is not None:
            seen = (f", {probe_data} {record['probe_mean_cosine']:.4f}" if probe else "")
            progress(f"budget {budget:.3f}: mean cosine {record['mean_cosine']:.4f}{seen} "
                     f"(floor {floor} + margin {margin():.4f})")
        return record

    best = trial(high)
    if best["mean_cosine"] < min(0.9999, floor + margin()):
        raise LowRankConfigError(
            f"even a budget of {high} keeps only mean cosine {best['mean_cosine']:.4f} < "
            f"{floor} + margin {margin():.4f} on the {selection_data}: lower --fidelity-floor "
            "or export the dense model"
        )
    lo, hi = low, high
    for _ in range(steps):
        middle = (lo + hi) / 2
        record = trial(middle)
        if record["mean_cosine"] >= min(0.9999, floor + margin()):
            best, hi = record, middle
        else:
            lo = middle
    final_margin = margin()
    logger.info("fidelity floor %.4f + margin %.4f: budget %.3f (mean cosine %.4f)", floor,
                final_margin, best["budget"], best["mean_cosine"])
    return BudgetSearchResult(
        floor=floor, budget=best["budget"], mean_cosine=best["mean_cosine"], trials=trials,
        margin=final_margin, target=floor + final_margin,
        probe_mean_cosine=best.get("probe_mean_cosine"), selection_data=selection_data,
        probe_data=probe_data if probe else None,
    )


@dataclass
class FloorVerdict:
    """Whether a fidelity floor held, dataset by dataset.

    Attributes:
        floor: The required mean cosine.
        figures: Dataset name -> ``{"mean_cosine", "worst_cosine"}`` of the judged model.
        met_on: Datasets whose mean cosine reached the floor.
        missed_on: Datasets whose mean cosine fell below it.
        selection_data: The data the budget was chosen on (its figure shows in ``figures``
            when given, but only held-out data decides ``met``).
    """

    floor: float
    figures: dict[str, dict[str, float]]
    met_on: list[str]
    missed_on: list[str]
    selection_data: str | None = None

    @property
    def met(self) -> bool:
        """True when every held-out figure reached the floor."""
        return not self.missed_on

    def lines(self) -> list[str]:
        """Report lines: where the floor was met, and a warning per held-out miss."""
        lines = []
        for name, figure in self.figures.items():
            if name == self.selection_data:
                # Reported for comparison; it never decides (the budget was chosen on it).
                state = "met" if figure["mean_cosine"] >= self.floor else "missed"
                role = " (selection data)"
            else:
                state = "met" if name in self.met_on else "MISSED"
                role = " (held out)"
            lines.append(
                f"fidelity floor {self.floor:g} {state} on {name}{role}: mean cosine "
                f"{figure['mean_cosine']:.4f}, worst {figure['worst_cosine']:.4f}"
            )
        if self.missed_on:
            lines.append(
                f"warning: the fidelity floor {self.floor:g} was not kept on "
                f"{', '.join(self.missed_on)}: raise the budget or --fidelity-floor margin, "
                "heal, or use --strict to fail the export"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with ``met``)."""
        return {**dataclasses.asdict(self), "met": self.met}


def judge_floor(
    floor: float,
    figures: Mapping[str, Mapping[str, float]],
    *,
    selection_data: str | None = None,
) -> FloorVerdict:
    """Judge a fidelity floor on measured figures.

    A floor counts as kept only when the mean cosine of every held-out dataset reaches it;
    the selection data's own figure (if passed, named by ``selection_data``) is reported but
    never decides, since the budget was chosen to meet it there.

    Args:
        floor: The required mean cosine.
        figures: Dataset name -> ``{"mean_cosine": ..., "worst_cosine": ...}``.
        selection_data: Which entry of ``figures`` (if any) is the selection data.

    Returns:
        The verdict; ``verdict.met`` is what ``--strict`` exits on.

    Raises:
        ValueError: No held-out figure to judge on.
    """
    held_out = [name for name in figures if name != selection_data]
    if not held_out:
        raise ValueError("judge_floor needs at least one held-out figure besides the selection")
    met_on, missed_on = [], []
    for name in figures:
        if name == selection_data:
            continue
        (met_on if figures[name]["mean_cosine"] >= floor else missed_on).append(name)
    verdict = FloorVerdict(
        floor=floor,
        figures={name: {k: float(v) for k, v in fig.items()} for name, fig in figures.items()},
        met_on=met_on, missed_on=missed_on, selection_data=selection_data,
    )
    for line in verdict.lines():
        (logger.warning if line.startswith("warning") else logger.info)(line)
    return verdict
