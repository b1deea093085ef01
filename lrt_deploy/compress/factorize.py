"""``factorize_``: swap a model's layers for low-rank pairs in place, ranks from a policy."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrt_deploy.compress.calibration import (
    CalibrationStatistics,
    collect_calibration_statistics,
    primary_output,
)
from lrt_deploy.compress.handlers import (
    FactorizationContext,
    Registration,
    register_handler,
    registration_for,
)
from lrt_deploy.compress.policies import (
    RankChoice,
    RankedLayer,
    max_saving_rank,
    policy_handler,
    spectrum_measure,
)
from lrt_deploy.compress.solvers import Spectrum, svd_spectrum
from lrt_deploy.config.lowrank import LowRankConfig, LowRankConfigError
from lrt_deploy.nn.lowrank import is_lowrank_pair

__all__ = [
    "FactorizationContext",
    "FactorizationResult",
    "LayerDecision",
    "factorize_",
    "register_handler",
]

logger = logging.getLogger(__name__)


@dataclass
class LayerDecision:
    """What ``factorize_`` did with one candidate layer."""

    #: Qualified module name.
    name: str
    #: Registered kind, e.g. ``"linear"`` or ``"embedding"``.
    kind: str
    #: Weight shape: ``(out, in)`` for linear, ``(num, dim)`` for embedding.
    shape: tuple[int, int]
    #: Rank used or considered; None when the layer was skipped before choosing one.
    rank: int | None
    #: ``min(shape)``.
    full_rank: int
    #: Parameters of the dense layer (weight and bias).
    params_dense: int
    #: Parameters after the decision (``params_dense`` when kept dense).
    params_after: int
    #: ``"factorized"`` or ``"kept_dense"``.
    action: str
    #: Human-readable why, including why this rank.
    reason: str
    #: Fraction of the layer's spectrum energy the rank keeps (whitened for ``"asvd"`` linears,
    #: frequency-weighted for embeddings); None when no spectrum was computed (kept dense before a
    #: rank was chosen, or a handler without one).
    energy_kept: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


@dataclass
class FactorizationResult:
    """Per-layer decisions of one ``factorize_`` call."""

    #: One decision per candidate layer, in model order.
    layers: list[LayerDecision] = field(default_factory=list)
    #: Names of modules that were low-rank units before the call.
    already_lowrank: list[str] = field(default_factory=list)

    @property
    def factorized(self) -> list[LayerDecision]:
        """Decisions of the layers replaced by low-rank pairs."""
        return [layer for layer in self.layers if layer.action == "factorized"]

    @property
    def kept_dense(self) -> list[LayerDecision]:
        """Decisions of the candidate layers left dense."""
        return [layer for layer in self.layers if layer.action == "kept_dense"]

    @property
    def params_before(self) -> int:
        """Total dense parameters of the candidate layers."""
        return sum(layer.params_dense for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Total parameters of the candidate layers after the call."""
        return sum(layer.params_after for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict, including the totals."""
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "already_lowrank": list(self.already_lowrank),
            "params_before": self.params_before,
            "params_after": self.params_after,
        }

    def summary(self) -> str:
        """One line: layer counts and the parameter change of the candidate layers."""
        before, after = self.params_before, self.params_after
        ratio = f" ({after / before:.1%})" if before else ""
        text = (
            f"factorized {len(self.factorized)}/{len(self.layers)} layers, "
            f"{len(self.kept_dense)} kept dense; parameters {before:,} -> {after:,}{ratio}"
        )
        if self.already_lowrank:
            text += f"; {len(self.already_lowrank)} already low-rank"
        return text


@dataclass
class _Candidate:
    name: str
    parent: nn.Module
    attribute: str
    module: nn.Module
    registration: Registration


def _find_candidates(
    model: nn.Module,
    config: LowRankConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None,
) -> tuple[list[_Candidate], list[str]]:
    candidates: list[_Candidate] = []
    already_lowrank: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for attribute, child in parent.named_children():
            name = f"{prefix}{attribute}"
            if is_lowrank_pair(child):
                # Its factors are nn.Linear themselves; descending would factor them again.
                already_lowrank.append(name)
                continue
            registration = registration_for(child)
            if registration is None:
                visit(child, f"{name}.")
                continue
            if not registration.enabled(config):
                continue
            if filter_fn is not None and not filter_fn(child, name):
                continue
            candidates.append(_Candidate(name, parent, attribute, child, registration))

    visit(model, "")
    return candidates, already_lowrank


def _shared_weight_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    return owners


@dataclass
class _Planned:
    candidate: _Candidate
    decision: LayerDecision
    by_policy: bool  # the rank is left to the config's policy
    spectrum: Spectrum | None = None


def _judge_rank(decision: LayerDecision, rank: int, why: str, config: LowRankConfig) -> None:
    """Factorize at ``rank`` unless that saves too few parameters; ``why`` names the source."""
    rows, cols = decision.shape
    decision.rank = rank
    params_extra = decision.params_dense - rows * cols
    params_lowrank = rank * (rows + cols) + params_extra
    if params_lowrank >= decision.params_dense:
        decision.reason = (
            f"rank {rank} saves no parameters ({decision.params_dense:,} -> {params_lowrank:,})"
        )
        return
    if params_lowrank > (1.0 - config.min_param_saving) * decision.params_dense:
        saving = 1.0 - params_lowrank / decision.params_dense
        decision.reason = (
            f"rank {rank} saves only {saving:.1%} of parameters "
            f"(min_param_saving is {config.min_param_saving:.1%})"
        )
        return
    decision.action = "factorized"
    decision.params_after = params_lowrank
    decision.reason = why


def _plan(
    candidate: _Candidate, config: LowRankConfig, owners: Mapping[int, list[str]]
) -> _Planned:
    module = candidate.module
    rows, cols = module.weight.shape
    full_rank = min(rows, cols)
    params_dense = sum(p.numel() for p in module.parameters(recurse=False))
    decision = LayerDecision(
        name=candidate.name,
        kind=candidate.registration.kind,
        shape=(rows, cols),
        rank=None,
        full_rank=full_rank,
        params_dense=params_dense,
        params_after=params_dense,
        action="kept_dense",
        reason="",
    )
    planned = _Planned(candidate, decision, by_policy=False)

    pattern = config.skip_pattern(candidate.name)
    if pattern is not None:
        decision.reason = f"skipped by pattern {pattern!r}"
        return planned
    others = sorted(set(owners.get(id(module.weight), [])) - {candidate.name})
    if others:
        decision.reason = f"weight is tied to {', '.join(others)}; factorizing would untie it"
        return planned

    pinned = config.rank_override_for(candidate.name, full_rank)
    fixed = policy_handler(config.policy).layer_rank(config.policy, full_rank)
    if pinned is not None:
        _judge_rank(decision, pinned, f"rank {pinned} from rank_overrides", config)
    elif fixed is not None:
        _judge_rank(decision, *fixed, config)
    elif max_saving_rank(rows, cols, params_dense - rows * cols, config.min_param_saving) < 1:
        decision.reason = f"no rank of this {rows}x{cols} layer saves enough parameters"
    else:
        planned.by_policy = True
    return planned


def _collect_statistics(
    model: nn.Module,
    config: LowRankConfig,
    planned: list[_Planned],
    calibration: Iterable[Mapping[str, torch.Tensor]] | None,
) -> CalibrationStatistics:
    needed = [p for p in planned if p.by_policy or p.decision.action == "factorized"]
    if config.solver != "asvd" or not needed:
        return CalibrationStatistics()
    linear_names = [
        p.candidate.name for p in needed if p.candidate.registration.uses_input_covariance
    ]
    embedding_names = [
        p.candidate.name for p in needed if p.candidate.registration.uses_index_counts
    ]
    return collect_calibration_statistics(model, linear_names, embedding_names, calibration)


def _context(
    candidate: _Candidate,
    config: LowRankConfig,
    stats: CalibrationStatistics,
    spectrum: Spectrum | None = None,
) -> FactorizationContext:
    return FactorizationContext(
        name=candidate.name,
        config=config,
        input_covariance=stats.covariances.get(candidate.name),
        index_counts=stats.index_counts.get(candidate.name),
        spectrum=spectrum,
    )


def _spectrum(
    planned: _Planned, config: LowRankConfig, stats: CalibrationStatistics
) -> Spectrum | None:
    candidate = planned.candidate
    spectrum_fn = candidate.registration.spectrum
    if spectrum_fn is not None:
        return spectrum_fn(candidate.module, _context(candidate, config, stats))
    # A policy needs singular values even from handlers that bring no spectrum of their own.
    return svd_spectrum(candidate.module.weight) if planned.by_policy else None


#: Calibration batches the budget policy runs per layer to measure its output gain.
PROBE_BATCHES = 2


def _probe_rank(decision: LayerDecision, config: LowRankConfig, budget: float) -> int:
    # The rank an even split of the budget would give the layer: the error level it will
    # roughly see, so the measured gain is the one that matters for the allocation.
    rows, cols = decision.shape
    extra = decision.params_dense - rows * cols
    limit = max_saving_rank(rows, cols, extra, config.min_param_saving)
    return min(limit, max(1, round(budget * rows * cols / (rows + cols))))


def _measure_output_gains(
    model: nn.Module,
    config: LowRankConfig,
    planned: list[_Planned],
    stats: CalibrationStatistics,
    batches: list[Mapping[str, torch.Tensor]],
    budget: float,
) -> dict[str, float]:
    """Model-output squared error per unit of each policy layer's own spectrum error."""
    # Layers differ in how much of their error reaches the output (a residual stream and a
    # LayerNorm shrink it, a wide projection amplifies it): each is truncated alone at its probe
    # rank, and the output's error over its predicted error is its gain, which the budget
    # policy weights its error by (a first-order model of the output error).
    device = next(model.parameters(), torch.empty(0)).device
    inputs = [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for batch in batches
    ]
    gains = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = [primary_output(model(**batch)).float() for batch in inputs]
            for p in tqdm(
                [p for p in planned if p.by_policy], desc="output gains", unit="layer", disable=None
            ):
                candidate, decision = p.candidate, p.decision
                rank = _probe_rank(decision, config, budget)
                error = p.spectrum.error(rank)
                context = _context(candidate, config, stats, p.spectrum)
                replacement = candidate.registration.handler(candidate.module, rank, context)
                if error == 0.0 or replacement is None:
                    gains[decision.name] = 1.0
                    continue
                setattr(candidate.parent, candidate.attribute, replacement)
                try:
                    damage = sum(
                        (primary_output(model(**batch)).float() - ref).square().sum(-1).mean()
                        for batch, ref in zip(inputs, reference, strict=True)
                    ) / len(inputs)
                finally:
                    setattr(candidate.parent, candidate.attribute, candidate.module)
                gains[decision.name] = float(damage) / error
    finally:
        model.train(was_training)
    return gains


def _apply_policy(
    config: LowRankConfig, planned: list[_Planned], gains: Mapping[str, float]
) -> None:
    layers = []
    for p in planned:
        if p.by_policy:
            rows, cols = p.decision.shape
            extra = p.decision.params_dense - rows * cols
            spectrum = p.spectrum
            gain = gains.get(p.decision.name)
            if gain is not None:
                spectrum = Spectrum(
                    spectrum.singular_values * gain**0.5, spectrum.method, spectrum._build
                )
            layers.append(
                RankedLayer(
                    name=p.decision.name,
                    spectrum=spectrum,
                    params_per_rank=rows + cols,
                    params_fixed=extra,
                    params_dense=p.decision.params_dense,
                    max_rank=max_saving_rank(rows, cols, extra, config.min_param_saving),
                )
            )
    if not layers:
        return
    total = sum(p.decision.params_dense for p in planned)
    fixed = sum(p.decision.params_after for p in planned if not p.by_policy)
    choices: dict[str, RankChoice] = policy_handler(config.policy).choose(
        config.policy, layers, total, fixed
    )
    for p in planned:
        choice = choices.get(p.decision.name)
        if choice is None:
            continue
        decision = p.decision
        decision.energy_kept = choice.energy_kept
        reason = choice.reason
        if decision.name in gains:
            reason += f" (output gain {gains[decision.name]:.3g})"
        if choice.rank is None:
            decision.reason = reason
        else:
            _judge_rank(decision, choice.rank, reason, config)


def factorize_(
    model: nn.Module,
    config: LowRankConfig,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
) -> FactorizationResult:
    """Replace ``model``'s registered layers (``filter_fn(module, name)`` permitting) by
    low-rank pairs in place; ``solver="asvd"`` reads ``calibration`` once, before any swap."""
    if config.solver == "asvd" and calibration is None:
        raise LowRankConfigError(
            "solver='asvd' fits layer outputs and needs calibration batches: pass "
            "calibration=[{'input_ids': ..., 'attention_mask': ...}, ...] or use solver='svd'"
        )
    probe_budget = policy_handler(config.policy).gain_probe(config.policy)
    if probe_budget is not None and calibration is not None:
        # Measuring output gains runs a few batches again.
        calibration = list(calibration)
    candidates, already_lowrank = _find_candidates(model, config, filter_fn)
    owners = _shared_weight_owners(model)
    planned = [_plan(candidate, config, owners) for candidate in candidates]
    stats = _collect_statistics(model, config, planned, calibration)
    for p in planned:
        if p.by_policy or p.decision.action == "factorized":
            p.spectrum = _spectrum(p, config, stats)
    gains: dict[str, float] = {}
    if probe_budget is not None and calibration:
        gains = _measure_output_gains(model, config, planned, stats, calibration[:PROBE_BATCHES],
                                      probe_budget)
    _apply_policy(config, planned, gains)

    result = FactorizationResult(already_lowrank=already_lowrank)
    for p in planned:
        candidate, decision = p.candidate, p.decision
        if decision.action == "factorized":
            context = _context(candidate, config, stats, p.spectrum)
            if p.spectrum is not None and decision.energy_kept is None:
                decision.energy_kept = p.spectrum.energy_kept(decision.rank)
                decision.reason += (
                    f" keeps {decision.energy_kept:.1%} of {spectrum_measure(p.spectrum)} energy"
                )
            replacement = candidate.registration.handler(candidate.module, decision.rank, context)
            if replacement is None:
                decision.action = "kept_dense"
                decision.params_after = decision.params_dense
                decision.reason = f"the {type(candidate.module).__name__} handler declined it"
            else:
                setattr(candidate.parent, candidate.attribute, replacement)
                decision.params_after = sum(param.numel() for param in replacement.parameters())
                if p.spectrum is not None:
                    method = p.spectrum.method
                else:
                    method = "asvd" if context.input_covariance is not None else "svd"
                decision.reason += (
                    f"; {method} ({decision.params_dense:,} -> {decision.params_after:,} "
                    "parameters)"
                )
        if decision.action == "kept_dense":
            logger.info("keeping %s dense: %s", decision.name, decision.reason)
        result.layers.append(decision)
    logger.info(result.summary())
    return result
