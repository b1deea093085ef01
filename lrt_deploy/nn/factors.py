"""Low-rank factor maths: one SVD per weight, balanced float32 factors at any rank from it.

Solvers work in float64 and split singular values as square roots into both factors, so neither
carries the whole dynamic range of ``W``.
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
    """ValueError unless ``weight`` is a matrix and ``rank`` an int in ``[1, min(shape)]``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D matrix, got shape {tuple(weight.shape)}")
    full_rank = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
        raise ValueError(f"rank must be an int in [1, {full_rank}], got {rank!r}")


def balanced_truncation(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(U sqrt(S), sqrt(S) Vh)`` of an SVD."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@dataclass(frozen=True)
class Spectrum:
    """One layer's decomposition: descending float64 singular values, factors at any rank.

    Truncating to rank ``r`` costs exactly ``sum(s[r:] ** 2)`` of the ``method``'s error measure
    (``"svd"``: ``||W - D E||_F^2``; ``"asvd"``: mean squared output error on calibration inputs;
    ``"weighted-svd"``: frequency-weighted mean squared row error), so layers measured alike can
    be compared and summed.
    """

    singular_values: torch.Tensor
    method: str
    _build: Callable[[int], tuple[torch.Tensor, torch.Tensor]] = field(repr=False, compare=False)

    @property
    def full_rank(self) -> int:
        """Number of singular values."""
        return int(self.singular_values.numel())

    @property
    def total_energy(self) -> float:
        """``sum(s ** 2)``: the error measure of dropping the whole layer."""
        return float(self.singular_values.square().sum())

    def error(self, rank: int) -> float:
        """Error measure left after truncating to ``rank``: ``sum(s[rank:] ** 2)``."""
        return float(self.singular_values[rank:].square().sum())

    def energy_kept(self, rank: int) -> float:
        """Fraction of ``total_energy`` the first ``rank`` directions keep (1.0 if zero)."""
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
        """Float32 factors ``(D, E)`` (``out x rank``, ``rank x in``) of the rank-``rank`` fit."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank must be an int in [1, {self.full_rank}], got {rank!r}")
        return self._build(rank)


def svd_spectrum(weight: torch.Tensor) -> Spectrum:
    """Spectrum of an ``out x in`` weight for truncated SVD (optimal for ``||W - D E||_F``)."""
    check_factor_inputs(weight, 1)
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)

    def build(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, encoder = balanced_truncation(u, s, vh, rank)
        return decoder.float(), encoder.float()

    return Spectrum(s, "svd", build)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated-SVD factors ``(D, E)``, ``out x rank`` and ``rank x in``."""
    check_factor_inputs(weight, rank)
    return svd_spectrum(weight).factors(rank)


def embedding_spectrum(weight: torch.Tensor, row_weights: torch.Tensor | None = None) -> Spectrum:
    """Spectrum of a ``num x dim`` embedding table, rows optionally weighted (e.g. by token
    frequency).

    The rank-``r`` basis is the top right-singular subspace of ``diag(sqrt(row_weights)) W``
    and every row is projected onto it, so the discarded squared singular values are exactly
    ``sum_i row_weights[i] * ||W_i - fit_i||^2``.
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
    """A ``num x dim`` embedding table as ``codes @ basis`` (``num x rank``, ``rank x dim``);
    see :func:`embedding_spectrum`."""
    check_factor_inputs(weight, rank)
    return embedding_spectrum(weight, row_weights).factors(rank)
