"""Factor solvers: find ``D`` (``out x r``) and ``E`` (``r x in``) with ``D @ E`` close to ``W``.

All solvers work in float64 for stability and return float32 factors on the weight's device.
Singular values are split as square roots into both factors (balanced factors), so neither
factor carries the whole dynamic range of ``W``.
"""

from __future__ import annotations

import logging

import torch

__all__ = [
    "embedding_factors",
    "svd_factors",
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


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD, optimal for ``||W - D E||_F``.

    Args:
        weight: ``out x in`` matrix.
        rank: Number of singular directions to keep.

    Returns:
        ``(D, E)`` with shapes ``out x rank`` and ``rank x in``.
    """
    _check_inputs(weight, rank)
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    decoder, encoder = _balanced_truncation(u, s, vh, rank)
    return decoder.float(), encoder.float()


def whitened_svd_factors(
    weight: torch.Tensor,
    input_cov: torch.Tensor,
    rank: int,
    damping: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware SVD, optimal for the output error ``||(W - D E) X||_F``.

    With ``C = X X^T / n`` factored as ``C = S S`` (``S`` symmetric), the output error equals
    ``||(W - D E) S||_F``, so the truncated SVD of ``W S`` mapped back through ``S^-1`` is the
    best rank-``rank`` fit on the calibration inputs. Eigenvalues of ``C`` are floored at
    ``damping * mean(eigenvalues)``, which keeps ``S`` invertible when the inputs span only a
    subspace and still fits ``W`` (with little weight) in the unseen directions.

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
        return svd_factors(weight, rank)

    eigenvalues = eigenvalues.clamp(min=damping * mean_eigenvalue)
    root = eigenvalues.sqrt()
    whiten = (eigenvectors * root) @ eigenvectors.T
    unwhiten = (eigenvectors / root) @ eigenvectors.T

    u, s, vh = torch.linalg.svd(w @ whiten, full_matrices=False)
    decoder, encoder = _balanced_truncation(u, s, vh, rank)
    return decoder.float(), (encoder @ unwhiten).float()


def embedding_factors(
    weight: torch.Tensor,
    rank: int,
    row_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor an embedding table ``W`` (``num x dim``) as ``codes @ basis``.

    The basis is the top right-singular subspace of ``W`` (of ``diag(sqrt(row_weights)) W``
    when weights are given, so frequent tokens are fitted best); every row is then projected
    onto it, which is its best approximation in that subspace whatever its weight.

    Args:
        weight: ``num_embeddings x embedding_dim`` table.
        rank: Width of the codes.
        row_weights: Optional non-negative per-row importance, e.g. token frequencies.

    Returns:
        ``(codes, basis)`` with shapes ``num x rank`` and ``rank x dim``.
    """
    _check_inputs(weight, rank)
    table = weight.detach().double()
    weighted = table
    if row_weights is not None:
        if row_weights.shape != (table.shape[0],) or bool((row_weights < 0).any()):
            raise ValueError(
                f"row_weights must be {table.shape[0]} non-negative values, one per row"
            )
        weighted = table * row_weights.to(table).sqrt()[:, None]
    _, _, vh = torch.linalg.svd(weighted, full_matrices=False)
    basis = vh[:rank]
    codes = table @ basis.T
    # Balance as in svd_factors: with unit weights the column norms of the codes are exactly
    # the singular values, so this reproduces the sqrt split.
    scale = codes.norm(dim=0).clamp(min=torch.finfo(torch.float64).tiny).sqrt()
    return (codes / scale).float(), (basis * scale[:, None]).float()
