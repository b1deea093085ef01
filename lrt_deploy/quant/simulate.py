"""The export's rounding in torch, for quantisation-aware healing: each ``nn.Linear`` and
``nn.Embedding`` computes on fake-quantised values (rounded to the export's grid, scaled back,
straight-through gradient), so training moves the float weights the export will round.

``"int8"`` is dynamic int8: weights per output channel on the export's int8 grid, tables per
tensor, each Linear's input uint8 over its own range; with ``smooth`` the outlier channels are
scaled first. ``"int4"`` is 4-bit weight-only blocks. The scales are torch mirrors of
:mod:`lrt_deploy.quant.rules`, kept equal to it by tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from lrt_deploy.quant.rules import (
    CALIBRATION_ROWS,
    INT8_WEIGHT_GRIDS,
    SAFE_PAIR_BOUND,
    channel_peak,
    outlier_scales,
)

__all__ = [
    "QUANTIZATIONS",
    "FakeQuantization",
    "fake_int4_blocks",
    "fake_int8_per_channel",
    "fake_int8_per_tensor",
    "fake_uint8_dynamic",
    "int4_block_scale",
    "int8_row_scale",
    "pair_safe_row_scale",
    "quantization_aware",
    "smoothing_scales",
    "snap_to_grid_",
]

QUANTIZATIONS = ("int8", "int4")


@dataclass(frozen=True)
class FakeQuantization:
    """Which deployed precision the healing loop simulates.

    Attributes:
        kind: ``"int8"`` (dynamic int8, per-channel weights) or ``"int4"`` (4-bit weights).
        block: Values per scale for ``"int4"`` (the export's block size).
        smooth: ``"int8"`` only: outlier input channels are smoothed first
            (scales from :func:`smoothing_scales`).
        weight_grid: ``"int8"`` only: one of :data:`lrt_deploy.quant.rules.INT8_WEIGHT_GRIDS`.
    """

    kind: str = "int8"
    block: int = 32
    smooth: bool = False
    weight_grid: str = "pair-safe"

    def __post_init__(self) -> None:
        if self.kind not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.kind!r}")
        if self.block < 2 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two, got {self.block!r}")
        if not isinstance(self.smooth, bool) or (self.smooth and self.kind != "int8"):
            raise ValueError(f"smooth must be a bool and goes with int8, got {self.smooth!r} "
                             f"with {self.kind!r}")
        if self.weight_grid not in INT8_WEIGHT_GRIDS:
            raise ValueError(f"weight_grid must be one of {INT8_WEIGHT_GRIDS}, got "
                             f"{self.weight_grid!r}")

    def describe(self) -> str:
        """A short label for logs and manifests."""
        if self.kind == "int4":
            return f"4-bit weights, block {self.block}"
        grid = f"dynamic int8, {self.weight_grid} weights"
        return f"{grid}, outlier channels smoothed" if self.smooth else grid


def _straight_through(value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    # Forward: the rounded value. Backward: the identity (rounding has no useful gradient).
    return value + (rounded - value).detach()


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def pair_safe_row_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per output row of ``weight`` (out x in): :func:`lrt_deploy.quant.rules.pair_safe_scale`."""
    values = weight.detach()
    if values.shape[1] % 2:
        values = functional.pad(values, (0, 1))
    even, odd = values[:, 0::2], values[:, 1::2]
    positive = even.clamp(min=0) + odd.clamp(min=0)
    negative = (-even).clamp(min=0) + (-odd).clamp(min=0)
    pairs = torch.maximum(positive, negative).amax(dim=1, keepdim=True) / SAFE_PAIR_BOUND
    return _nonzero(torch.maximum(values.abs().amax(dim=1, keepdim=True) / 127.0, pairs))


def int8_row_scale(weight: torch.Tensor, weight_grid: str = "pair-safe") -> torch.Tensor:
    """Per output row of ``weight`` (out x in): :func:`lrt_deploy.quant.rules.int8_weight_scale`."""
    if weight_grid == "pair-safe":
        return pair_safe_row_scale(weight)
    return _nonzero(weight.detach().abs().amax(dim=1, keepdim=True) / 127.0)


def fake_int8_per_channel(weight: torch.Tensor, weight_grid: str = "pair-safe") -> torch.Tensor:
    """``weight`` (out x in) through int8 per output row on ``weight_grid``."""
    scale = int8_row_scale(weight, weight_grid)
    return _straight_through(weight, torch.round(weight / scale).clamp(-127, 127) * scale)


def fake_int8_per_tensor(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` through full-range int8 with one scale for the whole tensor."""
    scale = _nonzero(weight.detach().abs().amax() / 127.0)
    return _straight_through(weight, torch.round(weight / scale).clamp(-127, 127) * scale)


def fake_uint8_dynamic(x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``DynamicQuantizeLinear``: uint8 over its own range widened to hold 0."""
    values = x.detach()
    low = values.amin().clamp(max=0.0)
    high = values.amax().clamp(min=0.0)
    scale = ((high - low) / 255.0).clamp(min=1e-12)
    zero_point = torch.round(-low / scale).clamp(0, 255)
    rounded = (torch.round(x / scale) + zero_point).clamp(0, 255)
    return _straight_through(x, (rounded - zero_point) * scale)


def int4_block_scale(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Per block of ``weight`` (rows x columns): :func:`lrt_deploy.quant.rules.int4_block_scale`."""
    rows, columns = weight.shape
    pad = (-columns) % block
    blocks = (functional.pad(weight, (0, pad)) if pad else weight).detach().reshape(rows, -1, block)
    signed_peak = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    return torch.where(signed_peak == 0, torch.ones_like(signed_peak), signed_peak / -8.0)


def fake_int4_blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``weight`` (rows x columns) through :func:`lrt_deploy.quant.rules.int4_blocks`."""
    rows, columns = weight.shape
    pad = (-columns) % block
    blocks = (functional.pad(weight, (0, pad)) if pad else weight).reshape(rows, -1, block)
    scale = int4_block_scale(weight, block)
    rounded = (torch.round(blocks / scale).clamp(-8, 7) * scale).reshape(rows, -1)[:, :columns]
    return _straight_through(weight, rounded)


def _as_spec(spec: FakeQuantization | str) -> FakeQuantization:
    return FakeQuantization(spec) if isinstance(spec, str) else spec


def _fake_weight(layer: nn.Linear | nn.Embedding, spec: FakeQuantization,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's weight as the export rounds it, in the unsmoothed frame when ``scale`` is set."""
    weight = layer.weight.float()
    if spec.kind == "int4":
        return fake_int4_blocks(weight, spec.block)
    if isinstance(layer, nn.Linear):
        if scale is None:
            return fake_int8_per_channel(weight, spec.weight_grid)
        scale = scale.to(weight.device)
        return fake_int8_per_channel(weight * scale, spec.weight_grid) / scale
    return fake_int8_per_tensor(weight)


def _linear_forward(layer: nn.Linear, spec: FakeQuantization,
                    scales: Mapping[nn.Module, torch.Tensor]) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        scale = scales.get(layer)
        if scale is not None:
            scale = scale.to(x.device)
        if spec.kind == "int8":  # activations too: DynamicQuantizeLinear before each MatMul
            # (after smoothing's Mul; the powers of two cancel exactly with the weight's)
            x = (fake_uint8_dynamic(x) if scale is None
                 else fake_uint8_dynamic(x / scale) * scale)
        bias = None if layer.bias is None else layer.bias.float()
        return functional.linear(x, _fake_weight(layer, spec, scale), bias)

    return forward


def _embedding_forward(table: nn.Embedding, spec: FakeQuantization) -> Any:
    def forward(ids: torch.Tensor) -> torch.Tensor:
        return functional.embedding(ids, _fake_weight(table, spec), table.padding_idx)

    return forward


@contextlib.contextmanager
def quantization_aware(
    module: nn.Module,
    spec: FakeQuantization | str,
    scales: Mapping[nn.Module, torch.Tensor] | None = None,
) -> Iterator[int]:
    """Within the block, ``module``'s Linear and Embedding layers compute as ``spec`` rounds;
    yields how many were switched. ``scales`` (:func:`smoothing_scales`) is read at each call."""
    spec = _as_spec(spec)
    if spec.smooth and scales is None:
        raise ValueError("a smoothed int8 simulation needs the scales (smoothing_scales)")
    scales = scales if scales is not None else {}
    patched: list[nn.Module] = []
    try:
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.forward = _linear_forward(layer, spec, scales)  # type: ignore[method-assign]
            elif isinstance(layer, nn.Embedding):
                layer.forward = _embedding_forward(layer, spec)  # type: ignore[method-assign]
            else:
                continue
            patched.append(layer)
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward  # the instance attribute: the class's forward shows again


@contextlib.contextmanager
def _float_forwards(module: nn.Module) -> Iterator[None]:
    """Within the block, layers switched by :func:`quantization_aware` compute in float."""
    stashed = {layer: layer.__dict__.pop("forward") for layer in module.modules()
               if "forward" in layer.__dict__}
    try:
        yield
    finally:
        for layer, forward in stashed.items():
            layer.forward = forward  # type: ignore[method-assign]


def _rows(batch: Mapping[str, Any], count: int) -> dict[str, Any]:
    return {name: value[:count] if isinstance(value, torch.Tensor) and value.ndim else value
            for name, value in batch.items()}


def smoothing_scales(
    module: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    max_rows: int = CALIBRATION_ROWS,
) -> dict[nn.Module, torch.Tensor]:
    """Per ``nn.Linear`` with outlier input channels, the export's smoothing scales, measured
    in float on the first ``max_rows`` rows of the export's calibration ``batches``."""
    peaks: dict[nn.Module, np.ndarray] = {}
    mask: list[np.ndarray | None] = [None]

    def hook(layer: nn.Module, args: tuple) -> None:
        # The export's measurement, on this model's input to the layer.
        peak = channel_peak(args[0].detach().float().cpu().numpy(), mask[0])
        peaks[layer] = np.maximum(peaks[layer], peak) if layer in peaks else peak

    linears = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
    handles = [layer.register_forward_pre_hook(hook) for layer in linears]
    device = next(module.parameters()).device
    rows = 0
    try:
        with torch.no_grad(), _float_forwards(module):
            for batch in batches:
                if rows >= max_rows:
                    break
                first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
                batch = _rows(batch, max_rows - rows)
                rows += min(len(first), max_rows - rows)
                attention = batch.get("attention_mask")
                mask[0] = None if attention is None else attention.cpu().numpy()
                module(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                          for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
    scales = {}
    for layer, peak in peaks.items():
        scale = outlier_scales(peak)
        if scale is not None:
            scales[layer] = torch.from_numpy(np.ascontiguousarray(scale)).to(device)
    return scales


def snap_to_grid_(module: nn.Module, spec: FakeQuantization | str,
                  only: set[int] | None = None,
                  scales: Mapping[nn.Module, torch.Tensor] | None = None) -> int:
    """Replace weights (those whose ``id()`` is in ``only``, or all) by their fake-quantised
    values in place, so the float model rounds to the same grid again; returns how many."""
    spec = _as_spec(spec)
    snapped = 0
    with torch.no_grad():
        for layer in module.modules():
            if not isinstance(layer, (nn.Linear, nn.Embedding)):
                continue
            weight = layer.weight
            if only is not None and id(weight) not in only:
                continue
            scale = None if scales is None else scales.get(layer)
            weight.copy_(_fake_weight(layer, spec, scale).to(weight.dtype))
            snapped += 1
    return snapped
