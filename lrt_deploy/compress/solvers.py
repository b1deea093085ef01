"""Factor solvers: find ``D`` (``out x r``) and ``E`` (``r x in``) with ``D @ E`` close to ``W``.

Each solver first computes a :class:`Spectrum`: the singular values of the matrix whose truncation
error it minimises, plus what is needed to build factors at any rank from that one
decomposition, so rank policies can compare layers and ``factorize_`` build the chosen factors
without a second SVD. All solvers work in float64 for stability and return float32 factors on
the weight's device.
Singular values are split as square roots into both factors (balanced factors), so neither
factor carries the whole dynamic range of ``W``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "Spectrum",
    "embedding_factors",
    "embedding_spectrum",
    "svd_factors",
    "svd_spectrum",
    "whitened_spectrum",
    "whitened_svd_factors",
]

logger = logging.getLogger(__name__)


def _check_inputs(weight: torch.Tensor, rank: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D matrix, got shape {tuple(weight.shape)}")
    full_rank = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
        raise ValueError(f"rank must be an int in [1, {full_rank}], got {rank!r}")


def _balanced_truncation(
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
    _check_inputs(weight, 1)
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)

    def build(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, encoder = _balanced_truncation(u, s, vh, rank)
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
    _check_inputs(weight, rank)
    return svd_spectrum(weight).factors(rank)


def whitened_spectrum(
    weight: torch.Tensor, input_cov: torch.Tensor, damping: float = 1e-4
) -> Spectrum:
    """Spectrum of ``W S`` for activation-aware SVD (optimal for the output error).

    With ``C = X X^T / n`` factored as ``C = S S`` (``S`` symmetric), the mean squared output
    error ``||(W - D E) X||_F^2 / n`` equals ``||(W - D E) S||_F^2``, so the truncated SVD of
    ``W S`` mapped back through ``S^-1`` is the best rank-``r`` fit on the calibration inputs
    and its discarded squared singular values are exactly that error. Eigenvalues of ``C`` are
    floored at ``damping * mean(eigenvalues)``, which keeps ``S`` invertible when the inputs
    span only a subspace and still fits ``W`` (with little weight) in the unseen directions.

    Args:
        weight: ``out x in`` matrix.
        input_cov: ``in x in`` second moment ``E[x x^T]`` of the layer's inputs.
        damping: Relative eigenvalue floor; must be positive.

    Returns:
        The :class:`Spectrum` with method ``"asvd"``; the plain ``"svd"`` one when the
        covariance is all zero (no calibration signal reached the layer).
    """
    _check_inputs(weight, 1)
    in_features = weight.shape[1]
    if input_cov.shape != (in_features, in_features):
        raise ValueError(
            f"input_cov must be ({in_features}, {in_features}) to match weight "
            f"{tuple(weight.shape)}, got {tuple(input_cov.shape)}"
        )
    if not damping > 0:
        raise ValueError(f"damping must be > 0 so the whitening stays invertible, got {damping}")

    w = weight.detach().double()
    cov = input_cov.detach().to(device=w.device, dtype=torch.float64)
    cov = (cov + cov.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    mean_eigenvalue = eigenvalues.mean().item()
    if not mean_eigenvalue > 0 or not torch.isfinite(eigenvalues).all():
        logger.warning("input covariance is zero or not finite; using plain SVD for this layer")
        return svd_spectrum(weight)

    eigenvalues = eigenvalues.clamp(min=damping * mean_eigenvalue)
    root = eigenvalues.sqrt()
    whiten = (eigenvectors * root) @ eigenvectors.T
    unwhiten = (eigenvectors / root) @ eigenvectors.T
    u, s, vh = torch.linalg.svd(w @ whiten, full_matrices=False)

    def build(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, encoder = _balanced_truncation(u, s, vh, rank)
        return decoder.float(), (encoder @ unwhiten).float()

    return Spectrum(s, "asvd", build)


def whitened_svd_factors(
    weight: torch.Tensor,
    input_cov: torch.Tensor,
    rank: int,
    damping: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware SVD, optimal for the output error ``||(W - D E) X||_F``.

    See :func:`whitened_spectrum` for the method.

    Args:
        weight: ``out x in`` matrix.
        input_cov: ``in x in`` second moment ``E[x x^T]`` of the layer's inputs.
        rank: Number of directions to keep.
        damping: Relative eigenvalue floor; must be positive.

    Returns:
        ``(D, E)`` with shapes ``out x rank`` and ``rank x in``. Falls back to plain SVD when
        the covariance is all zero (no calibration signal reached the layer).
    """
    _check_inputs(weight, rank)
    return whitened_spectrum(weight, input_cov, damping).factors(rank)


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
    _check_inputs(weight, 1)
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
    _check_inputs(weight, rank)
    return embedding_spectrum(weight, row_weights).factors(rank)
