"""Fidelity floor: the smallest budget keeping a required fidelity, and whether it held."""

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
from lrt_deploy.compress.factorize import FactorizationResult, factorize_
from lrt_deploy.config.lowrank import LowRankConfig
from lrt_deploy.config.ranks import BudgetRank, LowRankConfigError
from lrt_deploy.metrics import cosine_per_row

__all__ = ["BudgetSearchResult", "FloorVerdict", "judge_floor", "search_budget"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]


@dataclass
class BudgetSearchResult:
    """Outcome of :func:`search_budget`."""

    #: The required mean cosine to the dense model's primary output.
    floor: float
    #: The smallest tried budget that met the floor.
    budget: float
    #: Its mean cosine on the selection batches.
    mean_cosine: float
    #: Every budget tried with its mean cosine (and ``probe_mean_cosine``) and parameters kept, in
    #: order.
    trials: list[dict[str, float]] = field(default_factory=list)
    #: What was added to the floor on the selection data: the largest drop measured from the
    #: selection data to the probe data over the trials (0 without a probe).
    margin: float = 0.0
    #: ``floor + margin``, what the selection data had to reach.
    target: float = 0.0
    #: The chosen budget's mean cosine on the probe data.
    probe_mean_cosine: float | None = None
    #: What the selection batches were, for the report.
    selection_data: str = "selection batches"
    #: What the probe batches were, or None.
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


def _outputs(model: nn.Module, batches: Sequence[Batch]) -> list[np.ndarray]:
    with torch.no_grad():
        return [primary_output(model(**b)).detach().cpu().numpy() for b in batches]


@dataclass
class _Trials:
    """Budgets tried on deep copies of the dense model, and the margin the probe sets."""

    model: nn.Module
    config: LowRankConfig
    calibration: Sequence[Batch] | None
    selection: Sequence[Batch]
    floor: float
    probe: Sequence[Batch]
    max_margin: float
    progress: Callable[[str], None] | None
    probe_data: str
    records: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.references = _outputs(self.model, self.selection)
        self.probe_refs = _outputs(self.model, self.probe)

    def margin(self) -> float:
        """The largest selection-to-probe drop so far, capped at ``max_margin``."""
        drops = [t["mean_cosine"] - t["probe_mean_cosine"] for t in self.records
                 if "probe_mean_cosine" in t]
        return min(self.max_margin, max([0.0, *drops]))

    def target(self) -> float:
        """What the selection data must reach: floor + margin (never above 0.9999)."""
        return min(0.9999, self.floor + self.margin())

    def run(self, budget: float) -> dict[str, float]:
        """Factorize a copy at ``budget`` and record its fidelity."""
        candidate = copy.deepcopy(self.model)
        policy = BudgetRank(budget, self.config.policy.budget_error)
        result: FactorizationResult = factorize_(
            candidate, dataclasses.replace(self.config, policy=policy),
            calibration=self.calibration,
        )
        record = {"budget": budget,
                  "mean_cosine": _mean_cosine(candidate, self.references, self.selection),
                  "params_after": float(result.params_after),
                  "params_before": float(result.params_before)}
        if self.probe:
            record["probe_mean_cosine"] = _mean_cosine(candidate, self.probe_refs, self.probe)
        self.records.append(record)
        if self.progress is not None:
            seen = (f", {self.probe_data} {record['probe_mean_cosine']:.4f}" if self.probe
                    else "")
            self.progress(f"budget {budget:.3f}: mean cosine {record['mean_cosine']:.4f}{seen} "
                          f"(floor {self.floor} + margin {self.margin():.4f})")
        return record


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
    """Bisect ``config``'s BudgetRank for the smallest budget in [low, high] whose model keeps
    mean cosine ``floor`` (plus the probe's drop, at most ``max_margin``) on ``selection``."""
    if not isinstance(config.policy, BudgetRank):
        raise LowRankConfigError("search_budget needs a LowRankConfig with policy=BudgetRank(...)")
    if not 0.0 < floor < 1.0:
        raise LowRankConfigError(f"FidelityFloor.floor must be a fraction in (0, 1), got {floor}")
    trials = _Trials(model, config, calibration, selection, floor, probe or [], max_margin,
                     progress, probe_data)
    best = trials.run(high)
    if best["mean_cosine"] < trials.target():
        raise LowRankConfigError(
            f"even a budget of {high} keeps only mean cosine {best['mean_cosine']:.4f} < "
            f"{floor} + margin {trials.margin():.4f} on the {selection_data}: lower "
            "FidelityFloor.floor or export the dense model"
        )
    lo, hi = low, high
    for _ in range(steps):
        middle = (lo + hi) / 2
        record = trials.run(middle)
        if record["mean_cosine"] >= trials.target():
            best, hi = record, middle
        else:
            lo = middle
    margin = trials.margin()
    logger.info("fidelity floor %.4f + margin %.4f: budget %.3f (mean cosine %.4f)", floor,
                margin, best["budget"], best["mean_cosine"])
    return BudgetSearchResult(
        floor=floor, budget=best["budget"], mean_cosine=best["mean_cosine"],
        trials=trials.records, margin=margin, target=floor + margin,
        probe_mean_cosine=best.get("probe_mean_cosine"), selection_data=selection_data,
        probe_data=probe_data if probe else None,
    )


@dataclass
class FloorVerdict:
    """Whether a fidelity floor held, dataset by dataset."""

    #: The required mean cosine.
    floor: float
    #: Dataset name -> ``{"mean_cosine", "worst_cosine"}`` of the judged model.
    figures: dict[str, dict[str, float]]
    #: Datasets whose mean cosine reached the floor.
    met_on: list[str]
    #: Datasets whose mean cosine fell below it.
    missed_on: list[str]
    #: The data the budget was chosen on (its figure shows in ``figures`` when given, but only
    #: held-out data decides ``met``).
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
                f"{', '.join(self.missed_on)}: raise the floor (a larger budget follows), "
                "or heal"
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
    """Judge a fidelity floor on measured figures."""
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
