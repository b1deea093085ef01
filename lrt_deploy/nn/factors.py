"""Low-rank factor maths the ``nn`` modules need: the SVD of a weight and its balanced factors.

``LowRankLinear.from_linear`` and ``LowRankEmbedding.from_embedding`` build their factors here;
``lrt_deploy.compress.solvers`` adds the activation-aware (whitened) solver on top, so ``nn``
depends on nothing in ``compress``.

A :class:`Spectrum` holds the singular values of the matrix whose truncation error a solver
minimises, plus what is needed to build factors at any rank from that one decomposition, so rank
policies can compare layers and ``factorize_`` build the chosen factors without a second SVD.
All solvers work in float64 for stability and return float32 factors on the weight's device.
Singular values are split as square roots into both factors (balanced factors), so neither
factor carries the whole dynamic range of ``W``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "Spectrum",
    "balanced_truncation",
    "check_factor_inputs",
    "embedding_factors",
    "embedding_spectrum",
    "svd_factors",
    "svd_spectrum",
]


def check_factor_inputs(weight: torch.Tensor, rank: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D matrix, got shape {tuple(weight.shape)}")
    full_rank = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
        raise ValueError(f"rank must be an int in [1, {full_rank}], got {rank!r}")


def balanced_truncation(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@dataclass(frozen=True)
class Spectrum:
    """One layer's decomposition: singular values to choose a rank from, factors at any rank.

    The squared singular values add up to the layer's error measure: truncating to rank ``r``
    costs exactly ``sum(s[r:] ** 2)`` of it (``||W - D E||_F^2`` for ``"svd"``, the mean squared
    output error on the calibration inputs for ``"asvd"`` and the frequency-weighted mean
    squared row error for ``"weighted-svd"``), so errors of layers of the same kind of measure
    can be compared and summed.

    Attributes:
        singular_values: Descending float64 singular values.
        method: ``"svd"``, ``"asvd"`` or ``"weighted-svd"``: what the values measure.
    """

    singular_values: torch.Tensor
    method: str
    _build: Callable[[int], tuple[torch.Tensor, torch.Tensor]] = field(repr=False, compare=False)

    @property
    def full_rank(self) -> int:
        """Number of singular values (``min`` of the matrix shape)."""
        return int(self.singular_values.numel())

    @property
    def total_energy(self) -> float:
        """``sum(s ** 2)``: the error measure of dropping the whole layer."""
        return float(self.singular_values.square().sum())

    def error(self, rank: int) -> float:
        """Error measure left after truncating to ``rank``: ``sum(s[rank:] ** 2)``."""
        return float(self.singular_values[rank:].square().sum())

    def energy_kept(self, rank: int) -> float:
        """Fraction of ``total_energy`` the first ``rank`` directions keep (1.0 for a zero
        matrix, which any rank reproduces)."""
        total = self.total_energy
        return 1.0 if total == 0.0 else 1.0 - self.error(rank) / total

    def rank_for_energy(self, energy: float) -> int:
        """Smallest rank keeping at least ``energy`` of the total energy (at least 1)."""
        squares = self.singular_values.square()
        total = float(squares.sum())
        if total == 0.0:
            return 1
        kept = torch.cumsum(squares, 0) / total
        # The tolerance stops float round-off from asking for one more rank at energy=1.0.
        reached = torch.nonzero(kept >= energy - 1e-12)
        return max(1, int(reached[0]) + 1) if reached.numel() else self.full_rank

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 factors ``(D, E)`` (``out x rank``, ``rank x in``) of the rank-``rank`` fit.

        Raises:
            ValueError: ``rank`` is not an int in ``[1, full_rank]``.
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank must be an int in [1, {self.full_rank}], got {rank!r}")
        return self._build(rank)


def svd_spectrum(weight: torch.Tensor) -> Spectrum:
    """Spectrum of ``W`` itself, for plain truncated SVD (optimal for ``||W - D E||_F``).

    Args:
        weight: ``out x in`` matrix.

    Returns:
        Its :class:`Spectrum` with method ``"svd"``.
    """
    check_factor_inputs(weight, 1)
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)

    def build(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, encoder = balanced_truncation(u, s, vh, rank)
        return decoder.float(), encoder.float()

    return Spectrum(s, "svd", build)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD, optimal for ``||W - D E||_F``.

    Args:
        weight: ``out x in`` matrix.
        rank: Number of singular directions to keep.

    Returns:
        ``(D, E)`` with shapes ``out x rank`` and ``rank x in``.
    """
    check_factor_inputs(weight, rank)
    return svd_spectrum(weight).factors(rank)


def embedding_spectrum(weight: torch.Tensor, row_weights: torch.Tensor | None = None) -> Spectrum:
    """Spectrum of an embedding table ``W`` (``num x dim``), rows optionally weighted.

    The basis of the rank-``r`` fit is the top right-singular subspace of
    ``diag(sqrt(row_weights)) W``; every row is then projected onto it, which is its best
    approximation in that subspace whatever its weight. The discarded squared singular values
    are exactly ``sum_i row_weights[i] * ||W_i - fit_i||^2``: with weights summing to one, the
    mean squared error of a looked-up vector.

    Args:
        weight: ``num_embeddings x embedding_dim`` table.
        row_weights: Optional non-negative per-row importance, e.g. token frequencies.

    Returns:
        The :class:`Spectrum`, method ``"weighted-svd"`` with weights, ``"svd"`` without.
    """
    check_factor_inputs(weight, 1)
    table = weight.detach().double()
    weighted = table
    if row_weights is not None:
        if row_weights.shape != (table.shape[0],) or bool((row_weights < 0).any()):
            raise ValueError(
                f"row_weights must be {table.shape[0]} non-negative values, one per row"
            )
        weighted = table * row_weights.to(table).sqrt()[:, None]
    _, s, vh = torch.linalg.svd(weighted, full_matrices=False)

    def build(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        basis = vh[:rank]
        codes = table @ basis.T
        # Balance as in svd_factors: with unit weights the column norms of the codes are
        # exactly the singular values, so this reproduces the sqrt split.
        scale = codes.norm(dim=0).clamp(min=torch.finfo(torch.float64).tiny).sqrt()
        return (codes / scale).float(), (basis * scale[:, None]).float()

    return Spectrum(s, "svd" if row_weights is None else "weighted-svd", build)


def embedding_factors(
    weight: torch.Tensor,
    rank: int,
    row_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor an embedding table ``W`` (``num x dim``) as ``codes @ basis``.

    See :func:`embedding_spectrum` for the method.

    Args:
        weight: ``num_embeddings x embedding_dim`` table.
        rank: Width of the codes.
        row_weights: Optional non-negative per-row importance, e.g. token frequencies.

    Returns:
        ``(codes, basis)`` with shapes ``num x rank`` and ``rank x dim``.
    """
    check_factor_inputs(weight, rank)
    return embedding_spectrum(weight, row_weights).factors(rank)
