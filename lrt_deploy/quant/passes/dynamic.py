"""Dynamic int8: int8 weights, each MatMul's input rounded to uint8 at run time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lrt_deploy._logs import quiet_loggers
from lrt_deploy.graph.passes import PassContext, PassResult
from lrt_deploy.quant.passes.common import (
    QuantizationResult,
    check_grid,
    quantization_result,
    regrid,
)

__all__ = ["DYNAMIC_INT8_OP_TYPES", "DynamicInt8Pass", "quantize_int8"]

logger = logging.getLogger(__name__)

# Packed-QKV ``Attention`` becomes ``QAttention`` (the QKV projection in int8 inside the
# attention kernel); ``MultiHeadAttention`` has no integer kernel and stays float.
DYNAMIC_INT8_OP_TYPES = ("MatMul", "Gather", "Attention")


def quantize_int8(
    source: str | Path,
    target: str | Path,
    *,
    per_channel: bool = True,
    op_types: Sequence[str] = DYNAMIC_INT8_OP_TYPES,
    nodes_to_exclude: Sequence[str] = (),
    weight_grid: str = "pair-safe",
) -> QuantizationResult:
    """Write ``target``: ``source`` with dynamic int8 MatMul, Gather and Attention weights.

    Args:
        source: fp32 ONNX file.
        target: Where the quantised ONNX file goes.
        per_channel: One weight scale per output channel (else one per tensor).
        op_types: Op types to quantise.
        nodes_to_exclude: Node names kept in float.
        weight_grid: One of :data:`lrt_deploy.quant.rules.INT8_WEIGHT_GRIDS`.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    check_grid(weight_grid)
    with quiet_loggers(""):  # ORT's quantisers log hints on the root logger
        quantize_dynamic(
            str(source),
            str(target),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types),
            nodes_to_exclude=list(nodes_to_exclude),
            # Shape inference cannot type the outputs of com.microsoft ops (SkipLayerNorm,
            # BiasGelu); every float tensor in these graphs is fp32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    regridded = regrid(source, target, weight_grid)
    result = quantization_result(
        source, target, mode="dynamic", per_channel=per_channel, weight_type="int8",
        excluded_nodes=list(nodes_to_exclude),
        settings={"op_types": list(op_types), "weight_grid": weight_grid,
                  "pair_safe_weights": regridded},
    )
    logger.info("quantised int8 (per_channel=%s): %s", per_channel, result.quantized_ops)
    return result


@dataclass(frozen=True)
class DynamicInt8Pass:
    """Graph pass: :func:`quantize_int8`, keeping the nodes named in ``keep_float`` in float."""

    name: ClassVar[str] = "dynamic-int8"
    per_channel: bool = True
    weight_grid: str = "pair-safe"
    keep_float: Sequence[str] = ()

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Quantise ``model`` into ``context.output``."""
        context.progress(f"quantising {context.label} to int8 (per_channel={self.per_channel})")
        result = quantize_int8(model, context.output, per_channel=self.per_channel,
                               nodes_to_exclude=list(self.keep_float),
                               weight_grid=self.weight_grid)
        return PassResult(self.name, context.output, result.to_dict())
