"""Per-layer-type factorization handlers and their registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lrt_deploy.compress.solvers import (
    Spectrum,
    embedding_spectrum,
    svd_spectrum,
    whitened_spectrum,
)
from lrt_deploy.config.lowrank import LowRankConfig
from lrt_deploy.nn.lowrank import LowRankEmbedding, LowRankLinear

__all__ = [
    "EMBEDDING_UNIFORM_SHARE",
    "FactorizationContext",
    "Handler",
    "Registration",
    "SpectrumFn",
    "embedding_row_weights",
    "register_handler",
    "registration_for",
]


@dataclass(frozen=True)
class FactorizationContext:
    """What a handler may need beyond the module and its rank."""

    #: Qualified name of the module in the model.
    name: str
    #: The run's configuration.
    config: LowRankConfig
    #: ``E[x x^T]`` of the module's inputs when the handler asked for calibration statistics and the
    #: solver uses them, else None.
    input_covariance: torch.Tensor | None = None
    #: Per-row lookup counts of an embedding on the calibration data when the handler asked for them
    #: and the solver uses calibration, else None.
    index_counts: torch.Tensor | None = None
    #: The layer's spectrum, computed once by ``factorize_`` when the registration provides a
    #: spectrum function (or a rank policy needed one); build the factors from it rather than
    #: decomposing the weight again.
    spectrum: Spectrum | None = None


Handler = Callable[[nn.Module, int, FactorizationContext], nn.Module | None]
SpectrumFn = Callable[[nn.Module, FactorizationContext], Spectrum]


@dataclass(frozen=True)
class Registration:
    kind: str
    handler: Handler
    enabled: Callable[[LowRankConfig], bool]
    uses_input_covariance: bool
    uses_index_counts: bool
    spectrum: SpectrumFn | None


_HANDLERS: dict[type[nn.Module], Registration] = {}


def register_handler(
    module_type: type[nn.Module],
    *,
    kind: str | None = None,
    enabled: Callable[[LowRankConfig], bool] | None = None,
    uses_input_covariance: bool = False,
    uses_index_counts: bool = False,
    spectrum: SpectrumFn | None = None,
) -> Callable[[Handler], Handler]:
    """Register a handler building the low-rank replacement of ``module_type`` layers."""

    def decorator(handler: Handler) -> Handler:
        _HANDLERS[module_type] = Registration(
            kind=kind or module_type.__name__.lower(),
            handler=handler,
            enabled=enabled or (lambda config: True),
            uses_input_covariance=uses_input_covariance,
            uses_index_counts=uses_index_counts,
            spectrum=spectrum,
        )
        return handler

    return decorator


def registration_for(module: nn.Module) -> Registration | None:
    """The registration of ``module``'s nearest registered base class, or None."""
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def _linear_spectrum(module: nn.Linear, context: FactorizationContext) -> Spectrum:
    if context.config.solver == "asvd" and context.input_covariance is not None:
        return whitened_spectrum(module.weight, context.input_covariance, context.config.damping)
    return svd_spectrum(module.weight)


@register_handler(nn.Linear, kind="linear", uses_input_covariance=True, spectrum=_linear_spectrum)
def _factorize_linear(module: nn.Linear, rank: int, context: FactorizationContext) -> LowRankLinear:
    weight = module.weight.detach()
    spectrum = context.spectrum or _linear_spectrum(module, context)
    decoder, encoder = spectrum.factors(rank)
    bias = None if module.bias is None else module.bias.detach()
    return LowRankLinear.from_factors(decoder.to(weight.dtype), encoder.to(weight.dtype), bias)


#: Share of the embedding row weights spread evenly over all rows; the rest follows the
#: calibration lookup counts. A calibration corpus sees only a small part of a 30k vocabulary,
#: and held-out text uses tokens it never saw, so pure frequencies would let the fit ignore
#: most rows; the even share keeps every row fitted while frequent tokens are fitted best.
EMBEDDING_UNIFORM_SHARE = 0.5


def embedding_row_weights(counts: torch.Tensor) -> torch.Tensor:
    """Row weights (summing to one) for factorizing an embedding looked up ``counts`` times."""
    # Lookup frequencies mixed with an even share per row; summing to one, the weighted spectrum
    # measures a looked-up vector's mean squared error, the per-token unit of a linear layer's
    # whitened error, so a budget can trade rank between tables and linear layers.
    counts = counts.double()
    uniform = torch.full_like(counts, 1.0 / counts.numel())
    total = float(counts.sum())
    if total == 0.0:
        return uniform
    return (1.0 - EMBEDDING_UNIFORM_SHARE) * counts / total + EMBEDDING_UNIFORM_SHARE * uniform


def _embedding_spectrum(module: nn.Embedding, context: FactorizationContext) -> Spectrum:
    counts = context.index_counts
    if counts is None or float(counts.sum()) == 0.0:
        return embedding_spectrum(module.weight)
    return embedding_spectrum(module.weight, embedding_row_weights(counts))


@register_handler(
    nn.Embedding,
    kind="embedding",
    enabled=lambda config: config.factorize_embeddings,
    uses_index_counts=True,
    spectrum=_embedding_spectrum,
)
def _factorize_embedding(
    module: nn.Embedding, rank: int, context: FactorizationContext
) -> LowRankEmbedding | None:
    if module.max_norm is not None:
        # max_norm renormalises dense rows at lookup time; a factored table cannot match it.
        return None
    weight = module.weight.detach()
    spectrum = context.spectrum or _embedding_spectrum(module, context)
    codes, basis = spectrum.factors(rank)
    return LowRankEmbedding.from_factors(
        codes.to(weight.dtype), basis.to(weight.dtype), module.padding_idx
    )
