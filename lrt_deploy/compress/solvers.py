"""Factor solvers: find ``D`` (``out x r``) and ``E`` (``r x in``) with ``D @ E`` close to ``W``."""

from __future__ import annotations

import logging

import torch

from lrt_deploy.nn.factors import (
    Spectrum,
    balanced_truncation,
    check_factor_inputs,
    embedding_factors,
    embedding_spectrum,
    svd_factors,
    svd_spectrum,
)

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


def whitened_spectrum(
    weight: torch.Tensor, input_cov: torch.Tensor, damping: float = 1e-4
) -> Spectrum:
    """Spectrum of ``W S`` for activation-aware SVD (optimal for the output error)."""
    # With C = X X^T / n = S S, the output error ||(W - D E) X||^2 / n equals ||(W - D E) S||^2:
    # the truncated SVD of W S mapped back through S^-1 is the best fit on the calibration
    # inputs. Eigenvalues of C are floored at damping * their mean to keep S invertible.
    check_factor_inputs(weight, 1)
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
        decoder, encoder = balanced_truncation(u, s, vh, rank)
        return decoder.float(), (encoder @ unwhiten).float()

    return Spectrum(s, "asvd", build)


def whitened_svd_factors(
    weight: torch.Tensor,
    input_cov: torch.Tensor,
    rank: int,
    damping: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware SVD, optimal for the output error ``||(W - D E) X||_F``."""
    check_factor_inputs(weight, rank)
    return whitened_spectrum(weight, input_cov, damping).factors(rank)
