"""What the quantisation passes share: their result record, the quantised-op count, the weight
grid check, and re-rounding the integer kernels' weights onto the pair-safe grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.graph.ops import count_changes, op_counts
from lrt_deploy.quant.rules import INT8_WEIGHT_GRIDS, pair_safe_int8

__all__ = [
    "QUANTIZED_OP_TYPES",
    "QuantizationResult",
    "check_block_size",
    "check_grid",
    "make_weights_pair_safe",
    "quantization_result",
    "regrid",
]

QUANTIZED_OP_TYPES = (
    "MatMulInteger",
    "QAttention",
    "QEmbedLayerNormalization",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
    "MatMulNBits",
    "GatherBlockQuantized",
)


@dataclass
class QuantizationResult:
    """What quantisation did: settings and op-count changes (e.g. MatMul -> MatMulInteger)."""

    mode: str
    per_channel: bool
    weight_type: str
    quantized_ops: dict[str, int] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``quantization`` record."""
        return {
            "mode": self.mode,
            "per_channel": self.per_channel,
            "weight_type": self.weight_type,
            "quantized_ops": self.quantized_ops,
            "op_changes": self.changes,
            "excluded_nodes": list(self.excluded_nodes),
            "settings": dict(self.settings),
        }


def quantization_result(source: str | Path, target: str | Path, **fields: Any
                        ) -> QuantizationResult:
    """A :class:`QuantizationResult` with the op counts of ``target`` against ``source``."""
    before, after = op_counts(source), op_counts(target)
    quantized = {op: after[op] for op in QUANTIZED_OP_TYPES if after.get(op)}
    return QuantizationResult(quantized_ops=quantized, changes=count_changes(before, after),
                              **fields)


def check_grid(weight_grid: str) -> None:
    """Raise ``ValueError`` unless ``weight_grid`` is one of :data:`INT8_WEIGHT_GRIDS`."""
    if weight_grid not in INT8_WEIGHT_GRIDS:
        raise ValueError(f"weight_grid must be one of {INT8_WEIGHT_GRIDS}, got {weight_grid!r}")


def check_block_size(block_size: int) -> None:
    """Raise ``ValueError`` unless ``block_size`` is a power of 2 of at least 16."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2 of at least 16, got {block_size}")


def regrid(source: str | Path, target: str | Path, weight_grid: str) -> int:
    """Re-round ``target``'s integer-kernel weights from ``source``'s onto ``weight_grid``."""
    if weight_grid != "pair-safe":
        return 0
    from lrt_deploy.graph.external_data import load_model_proto, save_model_proto

    model = load_model_proto(target)
    count = make_weights_pair_safe(model, load_model_proto(source))
    if count:
        save_model_proto(model, target)
    return count


def _integer_weight_slots(model: Any) -> list[tuple[str, str]]:
    """(int8 weight, its scale) of every uint8 x int8 kernel on a constant (K, N) weight."""
    from lrt_deploy.quant.kernels import integer_nodes

    producer = {out: node for node in model.graph.node for out in node.output}
    by_name = {node.name: node for node in model.graph.node}
    scale_input = {"QAttention": 4, "DynamicQuantizeMatMul": 2, "MatMulIntegerToFloat": 3}
    slots = []
    for entry in integer_nodes(model):
        node = by_name.get(entry.name)
        if node is None or entry.kernel != "u8s8" or entry.pair_bound is None:
            continue
        if node.op_type in scale_input:
            slots.append((entry.weight, node.input[scale_input[node.op_type]]))
        elif node.op_type == "MatMulInteger":
            # The quantiser names the scale of ``<weight>_quantized`` ``<weight>_scale``.
            slots.append((entry.weight, f"{entry.weight.removesuffix('_quantized')}_scale"))
        elif node.op_type == "MatMul" and (dq := producer.get(node.input[1])) is not None:
            slots.append((entry.weight, dq.input[1]))
    return slots


def make_weights_pair_safe(model: Any, float_model: Any) -> int:
    """Re-round ``model``'s int8 kernel weights in place onto the pair-safe grid; returns how many.

    The float weights come from ``float_model`` (the quantiser's input) by name, else from the
    codes times their scale. Afterwards :func:`lrt_deploy.quant.kernels.exact_classes` lists
    every device class.
    """
    from onnx import numpy_helper

    floats = {init.name: init for init in float_model.graph.initializer}
    inits = {init.name: init for init in model.graph.initializer}
    done: set[str] = set()
    for weight_name, scale_name in _integer_weight_slots(model):
        if weight_name in done or weight_name not in inits or scale_name not in inits:
            continue
        codes = numpy_helper.to_array(inits[weight_name])
        scale = numpy_helper.to_array(inits[scale_name])
        original = floats.get(weight_name.removesuffix("_quantized"))
        weight = (numpy_helper.to_array(original).astype(np.float32)
                  if original is not None and tuple(original.dims) == codes.shape
                  else codes.astype(np.float32) * scale.reshape(1, -1))
        new_codes, new_scale = pair_safe_int8(weight, k_axis=0, per_channel=scale.size > 1)
        inits[weight_name].CopyFrom(numpy_helper.from_array(new_codes, weight_name))
        inits[scale_name].CopyFrom(numpy_helper.from_array(
            new_scale.reshape(scale.shape).astype(scale.dtype), scale_name))
        done.add(weight_name)
    return len(done)
