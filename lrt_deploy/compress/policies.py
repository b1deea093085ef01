"""Rank-policy handlers: each policy type mapped to how it chooses ranks from spectra."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from lrt_deploy.compress.solvers import Spectrum
from lrt_deploy.config.ranks import (
    BudgetRank,
    EnergyRank,
    LowRankConfigError,
    UniformRank,
    resolve_rank,
)

__all__ = [
    "PolicyHandler",
    "RankChoice",
    "RankedLayer",
    "budget_ranks",
    "energy_ranks",
    "max_saving_rank",
    "policy_handler",
    "register_policy",
    "spectrum_measure",
]

logger = logging.getLogger(__name__)

_MEASURE = {"asvd": "whitened", "weighted-svd": "frequency-weighted", "svd": "weight"}


def spectrum_measure(spectrum: Spectrum) -> str:
    """Adjective naming what a spectrum's energy measures, for reasons shown to people."""
    return _MEASURE.get(spectrum.method, spectrum.method)


def max_saving_rank(rows: int, cols: int, extra: int, min_param_saving: float = 0.0) -> int:
    """Largest rank whose low-rank form saves parameters (0 when none does)."""
    dense = rows * cols + extra
    per_rank = rows + cols
    strictly_below = (rows * cols - 1) // per_rank
    within_saving = int(((1.0 - min_param_saving) * dense - extra) // per_rank)
    return max(0, min(strictly_below, within_saving, rows, cols))


@dataclass(frozen=True)
class RankedLayer:
    """A layer a policy chooses a rank for."""

    #: Qualified module name.
    name: str
    #: The layer's spectrum; its errors are what the policy trades.
    spectrum: Spectrum
    #: Parameters one more rank costs: ``rows + cols``.
    params_per_rank: int
    #: Parameters kept whatever the rank (a bias).
    params_fixed: int
    #: Parameters of the dense layer.
    params_dense: int
    #: Largest rank that saves parameters (see :func:`max_saving_rank`), >= 1.
    max_rank: int

    def params_at(self, rank: int | None) -> int:
        """Parameters at ``rank`` (None: dense)."""
        if rank is None:
            return self.params_dense
        return rank * self.params_per_rank + self.params_fixed


@dataclass(frozen=True)
class RankChoice:
    """A policy's choice for one layer."""

    #: The rank, or None to keep the layer dense.
    rank: int | None
    #: Fraction of the spectrum energy kept (1.0 when dense).
    energy_kept: float
    #: Why, for the report.
    reason: str


def energy_ranks(layers: Sequence[RankedLayer], energy: float) -> dict[str, RankChoice]:
    """Per layer, the smallest rank keeping ``energy`` of its spectrum energy."""
    choices = {}
    for layer in layers:
        rank = layer.spectrum.rank_for_energy(energy)
        measure = spectrum_measure(layer.spectrum)
        kept = layer.spectrum.energy_kept(rank)
        if rank > layer.max_rank:
            choices[layer.name] = RankChoice(
                None,
                1.0,
                f"energy: keeping {energy:.1%} of {measure} energy needs rank {rank}, above "
                f"{layer.max_rank}, the largest that saves parameters",
            )
        else:
            choices[layer.name] = RankChoice(
                rank,
                kept,
                f"energy: rank {rank} is the smallest keeping {energy:.1%} of {measure} energy "
                f"({kept:.1%})",
            )
    return choices


@dataclass(frozen=True)
class _Segment:
    efficiency: float  # error removed per parameter added
    layer: int
    index: int  # position in the layer's hull, so a layer's segments are taken in order
    rank: int | None  # rank reached at the segment's end; None is dense
    cost: int


def _hull_segments(position: int, layer: RankedLayer) -> list[_Segment]:
    """Segments of the lower convex hull of the layer's (parameters, error) options."""
    # Options: ranks 1..max_rank and dense (zero error). On the hull every layer's efficiency
    # only falls, so one greedy pass over all segments by efficiency is optimal up to the last
    # segment that does not fit.
    options: list[tuple[int, float, int | None]] = [
        (layer.params_at(rank), layer.spectrum.error(rank), rank)
        for rank in range(1, layer.max_rank + 1)
    ]
    options.append((layer.params_dense, 0.0, None))
    hull: list[tuple[int, float, int | None]] = []
    for point in options:
        # Pop the last point while it lies on or above the chord from its predecessor to point.
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (y1 - y0) * (point[0] - x0) >= (point[1] - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append(point)
    return [
        _Segment((y0 - y1) / (x1 - x0), position, index, rank, x1 - x0)
        for index, ((x0, y0, _), (x1, y1, rank)) in enumerate(pairwise(hull))
    ]


def budget_ranks(layers: Sequence[RankedLayer], params_budget: float) -> dict[str, RankChoice]:
    """Spread ``params_budget`` parameters over the layers with the least total error, ending
    within one rank step of it; a layer best kept whole stays dense (rank None)."""
    # Every layer starts at rank 1; hull segments are bought by error removed per parameter, a
    # layer stopping at its first segment that no longer fits; single ranks then fill the rest.
    ranks: list[int | None] = [1] * len(layers)
    spent = sum(layer.params_at(1) for layer in layers)
    if spent > params_budget:
        raise LowRankConfigError(
            f"the budget leaves {params_budget:,.0f} parameters for the layers it allocates, "
            f"but rank 1 everywhere already needs {spent:,}: raise BudgetRank.budget, or skip "
            "fewer layers"
        )
    segments = sorted(
        (s for position, layer in enumerate(layers) for s in _hull_segments(position, layer)),
        key=lambda s: (-s.efficiency, s.layer, s.index),
    )
    next_index = [0] * len(layers)
    stopped = [False] * len(layers)
    for segment in segments:
        if stopped[segment.layer] or segment.index != next_index[segment.layer]:
            continue
        if spent + segment.cost > params_budget:
            stopped[segment.layer] = True
            continue
        spent += segment.cost
        ranks[segment.layer] = segment.rank
        next_index[segment.layer] += 1

    # Fill the rest one rank at a time: the ranks skipped inside a hull segment that no longer
    # fits are still worth their parameters.
    heap = []
    for position, layer in enumerate(layers):
        rank = ranks[position]
        if rank is not None and rank < layer.max_rank:
            gain = float(layer.spectrum.singular_values[rank].square()) / layer.params_per_rank
            heapq.heappush(heap, (-gain, position))
    while heap:
        _, position = heapq.heappop(heap)
        layer = layers[position]
        if spent + layer.params_per_rank > params_budget:
            continue
        spent += layer.params_per_rank
        rank = ranks[position] + 1
        ranks[position] = rank
        if rank < layer.max_rank:
            gain = float(layer.spectrum.singular_values[rank].square()) / layer.params_per_rank
            heapq.heappush(heap, (-gain, position))

    choices = {}
    for layer, rank in zip(layers, ranks, strict=True):
        measure = spectrum_measure(layer.spectrum)
        if rank is None:
            kept = layer.spectrum.energy_kept(layer.max_rank)
            choices[layer.name] = RankChoice(
                None,
                1.0,
                f"budget: dense is worth its parameters (rank {layer.max_rank}, the largest "
                f"that saves any, keeps only {kept:.1%} of {measure} energy)",
            )
        else:
            kept = layer.spectrum.energy_kept(rank)
            choices[layer.name] = RankChoice(
                rank, kept, f"budget: keeps {kept:.1%} of {measure} energy at rank {rank}"
            )
    logger.info(
        "budget policy: %s of %s parameters allocated", f"{spent:,}", f"{params_budget:,.0f}"
    )
    return choices


@dataclass(frozen=True)
class PolicyHandler:
    """What ``factorize_`` asks of one rank-policy type."""

    #: (policy, full_rank) -> (rank, reason) when the policy fixes a layer's rank alone, or
    #: None when ``choose`` picks it across the layers.
    layer_rank: Callable[[Any, int], tuple[int, str] | None]
    #: (policy, layers, params_total, params_fixed) -> a choice per layer left to the policy.
    choose: Callable[[Any, Sequence[RankedLayer], int, int], dict[str, RankChoice]]
    #: policy -> the budget at which each layer's output gain is measured, or None (no gains).
    gain_probe: Callable[[Any], float | None] = lambda _policy: None


_HANDLERS: dict[type, PolicyHandler] = {}


def register_policy(policy_type: type, handler: PolicyHandler) -> None:
    """Make ``factorize_`` apply ``policy_type`` configs with ``handler``."""
    _HANDLERS[policy_type] = handler


def policy_handler(policy: Any) -> PolicyHandler:
    """The handler registered for ``policy``'s type."""
    handler = _HANDLERS.get(type(policy))
    if handler is None:
        raise LowRankConfigError(
            f"factorize_ cannot apply {type(policy).__name__} directly: a FidelityFloor is "
            "searched (compress_model or search_budget turn it into a BudgetRank); registered "
            f"policies: {', '.join(t.__name__ for t in _HANDLERS)}"
        )
    return handler


def _uniform_rank(policy: UniformRank, full_rank: int) -> tuple[int, str]:
    rank = resolve_rank(policy.rank, full_rank)
    return rank, f"uniform rank {rank}"


def _no_choices(*_args: Any) -> dict[str, RankChoice]:
    return {}


def _budget_choices(policy: BudgetRank, layers: Sequence[RankedLayer], total: int,
                    fixed: int) -> dict[str, RankChoice]:
    return budget_ranks(layers, policy.budget * total - fixed)


register_policy(UniformRank, PolicyHandler(_uniform_rank, _no_choices))
register_policy(EnergyRank, PolicyHandler(
    lambda _policy, _full: None, lambda policy, layers, *_: energy_ranks(layers, policy.energy)
))
register_policy(BudgetRank, PolicyHandler(
    lambda _policy, _full: None, _budget_choices,
    lambda policy: policy.budget if policy.budget_error == "output" else None,
))
