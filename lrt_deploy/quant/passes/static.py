"""Static int8 in QDQ format: activation ranges calibrated on sample inputs."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lrt_deploy._logs import quiet_loggers
from lrt_deploy.graph.passes import PassContext, PassResult
from lrt_deploy.quant.passes.common import (
    QuantizationResult,
    check_grid,
    quantization_result,
    regrid,
)

__all__ = ["ACTIVATION_TYPES", "CALIBRATE_METHODS", "StaticInt8Pass", "quantize_static_int8"]

logger = logging.getLogger(__name__)

ACTIVATION_TYPES = ("uint8", "int8")
CALIBRATE_METHODS = ("entropy", "minmax", "percentile")


def _reader(batches: Iterable[Mapping[str, np.ndarray]], input_names: Sequence[str]) -> Any:
    """A ``CalibrationDataReader`` over named numpy batches (only the graph's inputs kept)."""
    from onnxruntime.quantization import CalibrationDataReader

    feeds = [{name: np.asarray(batch[name]) for name in input_names} for batch in batches]

    class _BatchReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

        def rewind(self) -> None:
            self._items = iter(feeds)

    return _BatchReader()


def _graph_input_names(path: str | Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    return [value.name for value in graph.input if value.name not in initializers]


def _check_options(activation_type: str, calibrate_method: str, weight_grid: str,
                   batches: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Raise ``ValueError`` naming the argument that :func:`quantize_static_int8` cannot use."""
    if activation_type not in ACTIVATION_TYPES:
        raise ValueError(f"activation_type must be int8 or uint8, got {activation_type!r}")
    if calibrate_method not in CALIBRATE_METHODS:
        raise ValueError(f"calibrate_method must be one of {sorted(CALIBRATE_METHODS)}, got "
                         f"{calibrate_method!r}")
    check_grid(weight_grid)
    shapes = {tuple(np.shape(value) for value in batch.values()) for batch in batches}
    if calibrate_method != "minmax" and len(shapes) > 1:
        raise ValueError(
            f"calibrate_method {calibrate_method!r} needs calibration batches of one shape: pad "
            "them to one length, or use minmax"
        )


def quantize_static_int8(
    source: str | Path,
    target: str | Path,
    calibration: Iterable[Mapping[str, np.ndarray]],
    *,
    per_channel: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] = ("MatMul",),
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
    weight_grid: str = "pair-safe",
) -> QuantizationResult:
    """Write ``target``: ``source`` with a QuantizeLinear/DequantizeLinear pair per int8 tensor.

    Args:
        source: fp32 ONNX file.
        target: Where the quantised ONNX file goes.
        calibration: Named numpy input batches the activation ranges come from.
        per_channel: One weight scale per output channel.
        nodes_to_exclude: Node names kept in float.
        op_types: Op types to quantise (QDQ around ops without an integer kernel only adds
            conversions).
        activation_type: ``uint8`` (asymmetric) or ``int8`` (symmetric); weights are int8.
        calibrate_method: ``minmax``, ``entropy`` or ``percentile`` (the last two need
            calibration batches of one shape).
        weight_grid: One of :data:`lrt_deploy.quant.rules.INT8_WEIGHT_GRIDS`.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    batches = list(calibration)
    _check_options(activation_type, calibrate_method, weight_grid, batches)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with quiet_loggers(""):  # ORT's quantisers log hints on the root logger
        quantize_static(
            str(source), str(target), _reader(batches, _graph_input_names(source)),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude),
            calibrate_method=methods[calibrate_method],
            extra_options={
                "ActivationSymmetric": activation_type == "int8",
                # A MatMul's output feeds ops without an integer kernel (bias Add, Gelu):
                # quantising it would only add rounding error.
                "OpTypesToExcludeOutputQuantization": list(op_types),
            },
        )
    regridded = regrid(source, target, weight_grid)
    result = quantization_result(
        source, target, mode="static-qdq", per_channel=per_channel, weight_type="int8",
        excluded_nodes=list(nodes_to_exclude),
        settings={"activation_type": activation_type, "calibrate_method": calibrate_method,
                  "op_types": list(op_types), "weight_grid": weight_grid,
                  "pair_safe_weights": regridded},
    )
    logger.info("quantised static QDQ int8 (per_channel=%s, %d excluded): %s", per_channel,
                len(result.excluded_nodes), result.quantized_ops)
    return result


@dataclass(frozen=True)
class StaticInt8Pass:
    """Graph pass: :func:`quantize_static_int8` on the context's calibration batches."""

    name: ClassVar[str] = "static-int8"
    per_channel: bool = True
    weight_grid: str = "pair-safe"
    keep_float: Sequence[str] = ()

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Quantise ``model`` into ``context.output``."""
        context.progress(f"quantising {context.label} to static int8 QDQ (calibrated)")
        result = quantize_static_int8(model, context.output, context.calibration,
                                      per_channel=self.per_channel,
                                      nodes_to_exclude=list(self.keep_float),
                                      weight_grid=self.weight_grid)
        return PassResult(self.name, context.output, result.to_dict())
