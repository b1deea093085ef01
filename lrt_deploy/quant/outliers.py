"""Which input channels of a matrix product are outliers, and by how much to scale them.

One rule, used twice: by the export's smoothing pass before dynamic int8
(:mod:`lrt_deploy.quant.passes.smoothing`, on the ONNX graph) and by the healing loop's simulation
of that export (:mod:`lrt_deploy.quant.simulate`, on the PyTorch model), so healing
trains for the rounding the bundle will do. Imports numpy only.

A channel whose peak ``|x|`` on calibration data is above ``ratio`` times the median channel's
peak is divided by a power of two that brings it near ``target`` times that median; the weight
rows reading it are multiplied by the same power. Powers of two keep the float product exact
(no mantissa bit changes), and they make the two measurements agree: a peak that moves a
little between the healed PyTorch model and its ONNX graph leaves the power where it was.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CALIBRATION_ROWS", "OUTLIER_RATIO", "TARGET_RATIO", "channel_peak", "check_thresholds",
    "outlier_scales",
]

#: A channel peaking above this multiple of the median channel's peak is an outlier.
OUTLIER_RATIO = 8.0
#: Where an outlier channel's peak is brought, as a multiple of the median channel's peak
#: (to the nearest power of two of the division).
TARGET_RATIO = 3.0
#: Calibration rows (sentences) the channel peaks are measured on.
CALIBRATION_ROWS = 64


def channel_peak(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per channel (last axis), the largest ``|x|`` of ``values``; tokens whose
    ``attention_mask`` is 0 are left out when the leading axes are the mask's."""
    flat = values.reshape(-1, values.shape[-1])
    if mask is not None and flat.shape[0] == mask.size:
        flat = flat[mask.reshape(-1) != 0]
    return np.abs(flat).max(axis=0) if len(flat) else np.zeros(flat.shape[1], flat.dtype)


def check_thresholds(ratio: float, target: float) -> None:
    """Raise ``ValueError`` unless ``0 < target <= ratio``."""
    if not 0 < target <= ratio:
        raise ValueError(f"target_ratio must be in (0, ratio], got {target} > {ratio}")


def outlier_scales(
    peak: np.ndarray, ratio: float = OUTLIER_RATIO, target: float = TARGET_RATIO
) -> np.ndarray | None:
    """Per channel, the power of two to divide the activation by (1 for ordinary channels).

    Args:
        peak: Largest ``|x|`` of each input channel on calibration data.
        ratio: Outlier threshold, as a multiple of the median channel's peak.
        target: Where an outlier's peak is brought, same unit (``0 < target <= ratio``).

    Returns:
        float32 scales, or ``None`` when no channel is an outlier.
    """
    check_thresholds(ratio, target)
    peak = np.asarray(peak, dtype=np.float64)
    median = float(np.median(peak)) if peak.size else 0.0
    outliers = peak > ratio * median
    if median <= 0 or not outliers.any():
        return None
    scale = np.ones(peak.shape, np.float32)
    scale[outliers] = np.exp2(np.round(np.log2(peak[outliers] / (target * median))))
    return scale
