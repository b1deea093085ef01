"""Output fidelity metrics; numpy only, so PyTorch and ONNX Runtime outputs score alike."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "cosine_per_row",
    "output_fidelity",
    "embedding_fidelity",
    "kl_divergence",
    "max_abs_diff",
    "sqnr_db",
    "top1_agreement",
]


def _pair(reference: ArrayLike, candidate: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: reference {ref.shape} vs candidate {cand.shape}")
    return ref, cand


def cosine_per_row(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Cosine similarity of matching vectors along the last axis."""
    x, y = _pair(a, b)
    if x.ndim == 0:
        raise ValueError("cosine needs vectors, got scalars")
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    norm_x = np.linalg.norm(x, axis=1)
    norm_y = np.linalg.norm(y, axis=1)
    denominator = norm_x * norm_y
    nonzero = denominator > 0
    cosine = np.zeros(x.shape[0])
    cosine[nonzero] = np.einsum("ij,ij->i", x[nonzero], y[nonzero]) / denominator[nonzero]
    cosine[(norm_x == 0) & (norm_y == 0)] = 1.0
    return np.clip(cosine, -1.0, 1.0)


def embedding_fidelity(reference: ArrayLike, candidate: ArrayLike) -> dict[str, float]:
    """Mean and worst per-vector cosine between two embedding arrays."""
    cosine = cosine_per_row(reference, candidate)
    return {"mean_cosine": float(cosine.mean()), "worst_cosine": float(cosine.min())}


def sqnr_db(reference: ArrayLike, candidate: ArrayLike) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - cand)^2)`` in dB."""
    ref, cand = _pair(reference, candidate)
    signal = float(np.sum(ref * ref))
    noise = float(np.sum((ref - cand) ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def top1_agreement(ref_logits: ArrayLike, cand_logits: ArrayLike) -> float:
    """Fraction of positions whose arg-max over the last axis agrees."""
    ref, cand = _pair(ref_logits, cand_logits)
    if ref.ndim == 0 or ref.size == 0:
        raise ValueError(f"top-1 needs non-empty logits with a class axis, got shape {ref.shape}")
    return float(np.mean(ref.argmax(axis=-1) == cand.argmax(axis=-1)))


def kl_divergence(ref_logits: ArrayLike, cand_logits: ArrayLike) -> float:
    """Mean KL(softmax(reference) || softmax(candidate)) over positions, in nats."""
    ref, cand = _pair(ref_logits, cand_logits)
    if ref.ndim == 0 or ref.size == 0:
        raise ValueError(f"KL needs non-empty logits with a class axis, got shape {ref.shape}")

    def log_softmax(x: np.ndarray) -> np.ndarray:
        shifted = x - x.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(ref.astype(np.float64)), log_softmax(cand.astype(np.float64))
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def max_abs_diff(reference: ArrayLike, candidate: ArrayLike) -> float:
    """Largest absolute element-wise difference (0.0 for empty arrays)."""
    ref, cand = _pair(reference, candidate)
    return float(np.max(np.abs(ref - cand))) if ref.size else 0.0


def output_fidelity(
    kind: str,
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
) -> dict[str, float]:
    """The fidelity metrics for a model of ``kind``, over several batches of its primary output."""
    cosines = []
    for ref, cand, mask in zip(reference, candidate, masks, strict=True):
        if kind == "text-hidden" and mask is not None:
            keep = mask.astype(bool)
            ref, cand = ref[keep], cand[keep]
        cosines.append(cosine_per_row(ref, cand))
    values = np.concatenate(cosines)
    ref_all = np.concatenate([r.reshape(-1) for r in reference])
    cand_all = np.concatenate([c.reshape(-1) for c in candidate])
    metrics = {
        "mean_cosine": float(values.mean()),
        "worst_cosine": float(values.min()),
        "sqnr_db": float(sqnr_db(ref_all, cand_all)),
    }
    if kind == "text-logits":
        ref_logits, cand_logits = np.concatenate(reference), np.concatenate(candidate)
        metrics["top1_agreement"] = top1_agreement(ref_logits, cand_logits)
        metrics["kl_divergence"] = kl_divergence(ref_logits, cand_logits)
    return metrics
