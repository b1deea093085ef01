"""int8 dynamic quantisation with per-channel weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrt_deploy.export.graph import count_changes, op_counts

__all__ = ["QuantizationResult", "quantize_int8"]

logger = logging.getLogger(__name__)


@dataclass
class QuantizationResult:
    """What quantisation did: settings and op-count changes (e.g. MatMul -> MatMulInteger)."""

    mode: str
    per_channel: bool
    weight_type: str
    quantized_ops: dict[str, int] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "per_channel": self.per_channel,
            "weight_type": self.weight_type,
            "quantized_ops": self.quantized_ops,
            "op_changes": self.changes,
        }


def quantize_int8(
    source: str | Path, target: str | Path, *, per_channel: bool = True
) -> QuantizationResult:
    """Dynamic int8 quantisation: weights int8 (signed, per output channel by default),
    activations quantised at run time. MatMul and Gather weights are quantised.

    Args:
        source: fp32 ONNX file (optimised or not).
        target: Where the quantised ONNX file goes.
        per_channel: One scale per output channel (per-tensor costs MiniLM ~0.04 cosine).

    Returns:
        The settings used and which ops changed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_logger = logging.getLogger()
    level = quant_logger.level
    # quantize_dynamic logs a pre-processing hint on the root logger; we pass an optimised graph.
    quant_logger.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(source),
            str(target),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gather"],
        )
    finally:
        quant_logger.setLevel(level)
    before, after = op_counts(source), op_counts(target)
    result = QuantizationResult(
        mode="dynamic",
        per_channel=per_channel,
        weight_type="int8",
        quantized_ops={
            op: after[op]
            for op in ("MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear")
            if after.get(op)
        },
        changes=count_changes(before, after),
    )
    logger.info("quantised int8 (per_channel=%s): %s", per_channel, result.quantized_ops)
    return result
