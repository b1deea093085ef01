"""The rounding rules, numpy only: int8 weight grids, the uint8 activation grid, int4 blocks,
and the outlier-channel scales; the ONNX passes and the torch simulation both follow these.

The *pair-safe* int8 grid exists because onnxruntime's uint8 x int8 kernel on x86 AVX2 (and
AVX-512 without VNNI) adds each adjacent pair of products along the inner axis into int16 with
saturation (:mod:`lrt_deploy.quant.kernels`). Per channel it takes the smallest scale that keeps
every code in ``[-127, 127]`` and every pair ``(2j, 2j+1)`` within :data:`SAFE_PAIR_BOUND`, so
every kernel is exact. The *full-range* grid maps the largest ``|w|`` to 127.

An outlier channel is one whose peak ``|x|`` exceeds ``ratio`` times the median channel's peak;
it is divided by the power of two that brings it nearest ``target`` times that median, and the
weight rows reading it are multiplied by the same power (powers of two keep the product exact).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CALIBRATION_ROWS",
    "INT8_WEIGHT_GRIDS",
    "OUTLIER_RATIO",
    "SAFE_PAIR_BOUND",
    "TARGET_RATIO",
    "adjacent_pairs",
    "channel_peak",
    "check_thresholds",
    "full_range_scale",
    "int4_block_scale",
    "int4_blocks",
    "int8_weight_scale",
    "outlier_scales",
    "pair_peaks",
    "pair_safe_int8",
    "pair_safe_scale",
    "symmetric_int8",
    "uint8_grid",
]

#: The int8 weight grids: ``pair-safe`` (exact on every device class) and ``full-range``.
INT8_WEIGHT_GRIDS = ("pair-safe", "full-range")

#: Largest pair bound that cannot saturate: ``255 * 128 <= 32767`` and ``-255 * 128 >= -32768``.
SAFE_PAIR_BOUND = 128

#: A channel peaking above this multiple of the median channel's peak is an outlier.
OUTLIER_RATIO = 8.0
#: Where an outlier channel's peak is brought, as a multiple of the median channel's peak.
TARGET_RATIO = 3.0
#: Calibration rows (sentences) the channel peaks are measured on.
CALIBRATION_ROWS = 64


def adjacent_pairs(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Even and odd slices of ``x`` along ``axis`` (integers as int32), an odd length 0-padded."""
    x = x.astype(np.int32) if x.dtype.kind in "iub" else x
    if x.shape[axis] % 2:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, 1)
        x = np.pad(x, pad)
    even = np.take(x, np.arange(0, x.shape[axis], 2), axis=axis)
    odd = np.take(x, np.arange(1, x.shape[axis], 2), axis=axis)
    return even, odd


def pair_peaks(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per adjacent pair along ``axis``, the larger of its positive-part and negative-part sums."""
    even, odd = adjacent_pairs(np.asarray(values), axis)
    positive = np.maximum(even, 0) + np.maximum(odd, 0)
    negative = np.maximum(-even, 0) + np.maximum(-odd, 0)
    return np.maximum(positive, negative)


def _reduced(weight: np.ndarray, k_axis: int, per_channel: bool) -> tuple[int, ...] | None:
    return (k_axis % weight.ndim,) if per_channel else None


def full_range_scale(weight: np.ndarray, k_axis: int = 0, per_channel: bool = True
                     ) -> np.ndarray:
    """Scale mapping the peak ``|w|`` to 127, per channel (size 1 along ``k_axis``) or tensor."""
    w = np.asarray(weight, np.float64)
    scale = np.abs(w).max(axis=_reduced(w, k_axis, per_channel), keepdims=True) / 127.0
    return np.where(scale == 0, 1.0, scale)


def pair_safe_scale(weight: np.ndarray, k_axis: int = 0, per_channel: bool = True) -> np.ndarray:
    """Pair-safe scale, shaped as :func:`full_range_scale`: codes in range, pairs within bound."""
    w = np.asarray(weight, np.float64)
    reduce = _reduced(w, k_axis, per_channel)
    peak = np.abs(w).max(axis=reduce, keepdims=True) / 127.0
    pairs = pair_peaks(w, k_axis).max(axis=reduce, keepdims=True) / SAFE_PAIR_BOUND
    scale = np.maximum(peak, pairs)
    return np.where(scale == 0, 1.0, scale)


def int8_weight_scale(weight: np.ndarray, grid: str, k_axis: int = 0,
                      per_channel: bool = True) -> np.ndarray:
    """The float32 scale of ``grid`` (one of :data:`INT8_WEIGHT_GRIDS`) for ``weight``."""
    if grid not in INT8_WEIGHT_GRIDS:
        raise ValueError(f"weight_grid must be one of {INT8_WEIGHT_GRIDS}, got {grid!r}")
    rule = pair_safe_scale if grid == "pair-safe" else full_range_scale
    return rule(weight, k_axis, per_channel).astype(np.float32)


def symmetric_int8(weight: np.ndarray, k_axis: int = 0, per_channel: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` on the full-range grid: int8 codes and float32 scales (keepdims shape)."""
    scale = full_range_scale(weight, k_axis, per_channel).astype(np.float32)
    codes = np.clip(np.rint(np.asarray(weight, np.float32) / scale), -127, 127)
    return codes.astype(np.int8), scale


def pair_safe_int8(weight: np.ndarray, k_axis: int = 0, per_channel: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` on the pair-safe grid: int8 codes whose pair peaks are at most 128, and scales."""
    scale = pair_safe_scale(weight, k_axis, per_channel).astype(np.float32)
    codes = np.clip(np.rint(np.asarray(weight, np.float32) / scale), -127, 127)
    # Float division can put a pair whose exact sum is 128 a hair over it: step the pair's
    # larger code towards zero until it fits (the invariant holds for any scale).
    moved = np.moveaxis(codes, k_axis, 0).copy()
    while (over := np.argwhere(pair_peaks(moved, 0) > SAFE_PAIR_BOUND)).size:
        for index in over:
            first, rest = 2 * index[0], tuple(index[1:])
            pair = [(k, *rest) for k in (first, first + 1) if k < moved.shape[0]]
            larger = max(pair, key=lambda at: abs(moved[at]))
            moved[larger] -= np.sign(moved[larger])
    codes = np.moveaxis(moved, 0, k_axis)
    return codes.astype(np.int8), scale


def uint8_grid(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of asymmetric uint8 over ``[low, high]`` widened to hold 0."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / 255.0
    if scale < np.finfo(np.float32).tiny:
        return np.float32(1.0), np.uint8(0)
    return np.float32(scale), np.uint8(np.clip(np.round(-low / scale), 0, 255))


def int4_block_scale(weight: np.ndarray, block: int) -> np.ndarray:
    """Per block of ``block`` columns (last axis, zero-padded), the signed peak over -8; 1 if 0."""
    rows, columns = weight.shape
    padded = np.pad(np.asarray(weight, np.float32), ((0, 0), (0, (-columns) % block)))
    blocks = padded.reshape(rows, -1, block)
    index = np.abs(blocks).argmax(axis=-1)[..., None]
    signed_peak = np.take_along_axis(blocks, index, axis=-1)
    return np.where(signed_peak == 0, np.float32(1.0), signed_peak / np.float32(-8.0))


def int4_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` (rows x columns) as symmetric int4 blocks: codes in [-8, 7] and block scales."""
    rows, columns = weight.shape
    scale = int4_block_scale(weight, block)
    padded = np.pad(np.asarray(weight, np.float32), ((0, 0), (0, (-columns) % block)))
    codes = np.clip(np.rint(padded.reshape(rows, -1, block) / scale), -8, 7)
    return codes.reshape(rows, -1)[:, :columns].astype(np.int8), scale[..., 0]


def channel_peak(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per channel (last axis), the largest ``|x|``; tokens whose mask is 0 are left out."""
    flat = values.reshape(-1, values.shape[-1])
    if mask is not None and flat.shape[0] == mask.size:
        flat = flat[mask.reshape(-1) != 0]
    return np.abs(flat).max(axis=0) if len(flat) else np.zeros(flat.shape[1], flat.dtype)


def check_thresholds(ratio: float, target: float) -> None:
    """Raise ``ValueError`` unless ``0 < target <= ratio``."""
    if not 0 < target <= ratio:
        raise ValueError(f"target_ratio must be in (0, ratio], got {target} > {ratio}")


def outlier_scales(peak: np.ndarray, ratio: float = OUTLIER_RATIO,
                   target: float = TARGET_RATIO) -> np.ndarray | None:
    """Per channel, the power of two to divide the activation by (1 elsewhere); None: no outlier."""
    check_thresholds(ratio, target)
    peak = np.asarray(peak, dtype=np.float64)
    median = float(np.median(peak)) if peak.size else 0.0
    outliers = peak > ratio * median
    if median <= 0 or not outliers.any():
        return None
    scale = np.ones(peak.shape, np.float32)
    scale[outliers] = np.exp2(np.round(np.log2(peak[outliers] / (target * median))))
    return scale
