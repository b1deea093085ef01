"""In-place factorization of a model's layers into low-rank pairs: ``factorize_``.

A registry maps a layer type to a handler that builds its low-rank replacement; the model walker
is generic and decides per layer (skip patterns, rank, parameter saving) before calling it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lrt_deploy.compress.calibration import collect_input_covariances
from lrt_deploy.compress.config import LowRankConfig, LowRankConfigError
from lrt_deploy.compress.solvers import embedding_factors, svd_factors, whitened_svd_factors
from lrt_deploy.nn.lowrank import LowRankEmbedding, LowRankLinear, is_lowrank_pair

__all__ = [
    "FactorizationContext",
    "FactorizationResult",
    "LayerDecision",
    "factorize_",
    "register_handler",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FactorizationContext:
    """What a handler may need beyond the module and its rank.

    Attributes:
        name: Qualified name of the module in the model.
        config: The run's configuration.
        input_covariance: ``E[x x^T]`` of the module's inputs when the handler asked for
            calibration statistics and the solver uses them, else None.
    """

    name: str
    config: LowRankConfig
    input_covariance: torch.Tensor | None = None


Handler = Callable[[nn.Module, int, FactorizationContext], nn.Module | None]


@dataclass(frozen=True)
class _Registration:
    kind: str
    handler: Handler
    enabled: Callable[[LowRankConfig], bool]
    uses_input_covariance: bool


_HANDLERS: dict[type[nn.Module], _Registration] = {}


def register_handler(
    module_type: type[nn.Module],
    *,
    kind: str | None = None,
    enabled: Callable[[LowRankConfig], bool] | None = None,
    uses_input_covariance: bool = False,
) -> Callable[[Handler], Handler]:
    """Register a handler building the low-rank replacement of ``module_type`` layers.

    The layer must hold a 2-D ``weight``; its parameter saving is judged as
    ``rank * (rows + cols)`` (plus any bias) against its dense parameters before the handler
    runs. Subclasses use the handler of their nearest registered base class.

    Args:
        module_type: Layer class handled.
        kind: Name in reports; defaults to the lower-cased class name.
        enabled: Whether the config asks for this kind of layer at all; default always.
        uses_input_covariance: Collect ``E[x x^T]`` of the layer's inputs for ``"asvd"``.

    Returns:
        A decorator registering ``handler(module, rank, context) -> nn.Module | None``; a
        handler returns None to keep the layer dense.
    """

    def decorator(handler: Handler) -> Handler:
        _HANDLERS[module_type] = _Registration(
            kind=kind or module_type.__name__.lower(),
            handler=handler,
            enabled=enabled or (lambda config: True),
            uses_input_covariance=uses_input_covariance,
        )
        return handler

    return decorator


def _registration_for(module: nn.Module) -> _Registration | None:
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


@register_handler(nn.Linear, kind="linear", uses_input_covariance=True)
def _factorize_linear(module: nn.Linear, rank: int, context: FactorizationContext) -> LowRankLinear:
    weight = module.weight.detach()
    if context.config.solver == "asvd" and context.input_covariance is not None:
        decoder, encoder = whitened_svd_factors(
            weight, context.input_covariance, rank, context.config.damping
        )
    else:
        decoder, encoder = svd_factors(weight, rank)
    bias = None if module.bias is None else module.bias.detach()
    return LowRankLinear.from_factors(decoder.to(weight.dtype), encoder.to(weight.dtype), bias)


@register_handler(
    nn.Embedding, kind="embedding", enabled=lambda config: config.factorize_embeddings
)
def _factorize_embedding(
    module: nn.Embedding, rank: int, context: FactorizationContext
) -> LowRankEmbedding | None:
    if module.max_norm is not None:
        # max_norm renormalises dense rows at lookup time; a factored table cannot match it.
        return None
    weight = module.weight.detach()
    codes, basis = embedding_factors(weight, rank)
    return LowRankEmbedding.from_factors(
        codes.to(weight.dtype), basis.to(weight.dtype), module.padding_idx
    )


@dataclass
class LayerDecision:
    """What ``factorize_`` did with one candidate layer.

    Attributes:
        name: Qualified module name.
        kind: Registered kind, e.g. ``"linear"`` or ``"embedding"``.
        shape: Weight shape: ``(out, in)`` for linear, ``(num, dim)`` for embedding.
        rank: Rank used or considered; None when the layer was skipped before choosing one.
        full_rank: ``min(shape)``.
        params_dense: Parameters of the dense layer (weight and bias).
        params_after: Parameters after the decision (``params_dense`` when kept dense).
        action: ``"factorized"`` or ``"kept_dense"``.
        reason: Human-readable why.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int | None
    full_rank: int
    params_dense: int
    params_after: int
    action: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


@dataclass
class FactorizationResult:
    """Per-layer decisions of one ``factorize_`` call.

    Attributes:
        layers: One decision per candidate layer, in model order.
        already_lowrank: Names of modules that were low-rank units before the call.
    """

    layers: list[LayerDecision] = field(default_factory=list)
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
    registration: _Registration


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
            registration = _registration_for(child)
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


def _plan(
    candidate: _Candidate, config: LowRankConfig, owners: Mapping[int, list[str]]
) -> LayerDecision:
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

    pattern = config.skip_pattern(candidate.name)
    if pattern is not None:
        decision.reason = f"skipped by pattern {pattern!r}"
        return decision
    others = sorted(set(owners.get(id(module.weight), [])) - {candidate.name})
    if others:
        decision.reason = f"weight is tied to {', '.join(others)}; factorizing would untie it"
        return decision

    rank = config.rank_for(candidate.name, full_rank)
    decision.rank = rank
    params_extra = params_dense - module.weight.numel()
    params_lowrank = rank * (rows + cols) + params_extra
    if params_lowrank >= params_dense:
        decision.reason = (
            f"rank {rank} saves no parameters ({params_dense:,} -> {params_lowrank:,})"
        )
        return decision
    if params_lowrank > (1.0 - config.min_param_saving) * params_dense:
        saving = 1.0 - params_lowrank / params_dense
        decision.reason = (
            f"rank {rank} saves only {saving:.1%} of parameters "
            f"(min_param_saving is {config.min_param_saving:.1%})"
        )
        return decision

    decision.action = "factorized"
    decision.params_after = params_lowrank
    return decision


def factorize_(
    model: nn.Module,
    config: LowRankConfig,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
) -> FactorizationResult:
    """Replace the model's dense layers by low-rank pairs, in place.

    Candidate layers are the children (at any depth) of registered types, by default
    ``nn.Linear`` and, with ``config.factorize_embeddings``, ``nn.Embedding``. Modules that are
    already low-rank units are left alone and listed in ``already_lowrank``.

    Args:
        model: Model to modify in place.
        config: Ranks, solver and which layers to keep dense.
        filter_fn: ``filter_fn(module, fqn) -> bool`` further choosing candidate layers.
        calibration: Keyword-argument dicts for ``model(**batch)``; required by
            ``solver="asvd"``, consumed in a single pass before any layer is replaced.

    Returns:
        The decision made for each candidate layer.

    Raises:
        LowRankConfigError: ``solver="asvd"`` without calibration batches.
    """
    if config.solver == "asvd" and calibration is None:
        raise LowRankConfigError(
            "solver='asvd' fits layer outputs and needs calibration batches: pass "
            "calibration=[{'input_ids': ..., 'attention_mask': ...}, ...] or use solver='svd'"
        )
    candidates, already_lowrank = _find_candidates(model, config, filter_fn)
    owners = _shared_weight_owners(model)
    planned = [(candidate, _plan(candidate, config, owners)) for candidate in candidates]

    covariances: dict[str, torch.Tensor] = {}
    if config.solver == "asvd":
        names = [
            candidate.name
            for candidate, decision in planned
            if decision.action == "factorized" and candidate.registration.uses_input_covariance
        ]
        if names:
            covariances = collect_input_covariances(model, names, calibration)

    result = FactorizationResult(already_lowrank=already_lowrank)
    for candidate, decision in planned:
        if decision.action == "factorized":
            context = FactorizationContext(
                name=candidate.name,
                config=config,
                input_covariance=covariances.get(candidate.name),
            )
            replacement = candidate.registration.handler(candidate.module, decision.rank, context)
            if replacement is None:
                decision.action = "kept_dense"
                decision.params_after = decision.params_dense
                decision.reason = f"the {type(candidate.module).__name__} handler declined it"
            else:
                setattr(candidate.parent, candidate.attribute, replacement)
                decision.params_after = sum(p.numel() for p in replacement.parameters())
                solver = "asvd" if context.input_covariance is not None else "svd"
                decision.reason = (
                    f"{solver} rank {decision.rank} "
                    f"({decision.params_dense:,} -> {decision.params_after:,} parameters)"
                )
        if decision.action == "kept_dense":
            logger.info("keeping %s dense: %s", decision.name, decision.reason)
        result.layers.append(decision)
    logger.info(result.summary())
    return result
