"""Integer grids, numpy only: the int8 weight grid that is exact on every device class.

Symmetric int8 per output channel maps the largest ``|w|`` to 127. On x86 AVX2 (and AVX-512
without VNNI) onnxruntime's uint8 x int8 kernel adds each adjacent pair of products along the
inner axis into int16 and saturates there (:mod:`lrt_deploy.quant.kernels`), so such weights
compute wrongly on those CPUs. The *pair-safe* grid takes, per channel, the smallest scale that
keeps every code in ``[-127, 127]`` and every pair ``(2j, 2j+1)`` within the safe bound (its
positive parts, and its negative parts, each sum to at most 128 in magnitude). Every kernel is
then exact, with the same kernel and file size as before; on MiniLM's weights the grid keeps a
median of ~100 levels per channel (7-bit weights, onnxruntime's ``reduce_range``, keep 64).
"""

from __future__ import annotations

import numpy as np

from lrt_deploy.quant.kernels import SAFE_PAIR_BOUND, pair_peaks

__all__ = ["INT8_WEIGHT_GRIDS", "pair_safe_int8", "pair_safe_scale"]

#: The weight grids dynamic and static int8 can use: ``pair-safe`` (exact on every device
#: class) and ``full-range`` (``[-127, 127]``, exact only where the kernel does not saturate).
INT8_WEIGHT_GRIDS = ("pair-safe", "full-range")


def pair_safe_scale(weight: np.ndarray, k_axis: int = 0, per_channel: bool = True) -> np.ndarray:
    """Scale of the pair-safe int8 grid: per channel (every axis but ``k_axis`` kept, size 1
    along it) or one for the tensor, shaped to broadcast against ``weight``; 1 where all zero.

    Invariant: ``round(weight / scale)`` lies in [-127, 127] and its pair bound along
    ``k_axis`` is at most 128 (up to rounding, which :func:`pair_safe_int8` settles)."""
    w = np.asarray(weight, np.float64)
    reduce = (k_axis % w.ndim,) if per_channel else None
    peak = np.abs(w).max(axis=reduce, keepdims=True) / 127.0
    pairs = pair_peaks(w, k_axis).max(axis=reduce, keepdims=True) / SAFE_PAIR_BOUND
    scale = np.maximum(peak, pairs)
    return np.where(scale == 0, 1.0, scale)


def pair_safe_int8(weight: np.ndarray, k_axis: int = 0, per_channel: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` on the pair-safe grid: int8 codes and float32 scales (as from
    :func:`pair_safe_scale`). Invariant: ``pair_bound(codes, k_axis) <= 128``."""
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

