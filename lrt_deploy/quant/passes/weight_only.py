"""Weight-only quantisation, activations float: int8 (``MatMulNBits`` bits=8 and
``DequantizeLinear``) and 4-bit (``MatMulNBits``, ``GatherBlockQuantized``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lrt_deploy._logs import quiet_loggers
from lrt_deploy.graph.passes import PassContext, PassResult
from lrt_deploy.quant.passes.common import (
    QuantizationResult,
    check_block_size,
    quantization_result,
)
from lrt_deploy.quant.rules import symmetric_int8

__all__ = [
    "Int4WeightOnlyPass",
    "Int8WeightOnlyPass",
    "quantize_weights_4bit",
    "quantize_weights_int8",
]

logger = logging.getLogger(__name__)

# (domain, op_type) -> (weight input, axis of the per-channel scale in the weight, axis of the
# scale in what DequantizeLinear dequantises). Attention dequantises its [K, 3H] weight per
# column; Gather gathers int8 rows and dequantises only those. MatMul weights are not here:
# ORT's extended optimisations fuse DequantizeLinear -> MatMul into int8-activation compute, so
# they become MatMulNBits (float compute) instead.
_DEQUANTIZED_WEIGHTS: dict[tuple[str, str], tuple[int, int, int]] = {
    ("com.microsoft", "Attention"): (1, 1, 1),
    ("", "Gather"): (0, 1, -1),
}


def _small_matmuls(model: Any, min_elements: int) -> list[str]:
    """Names of the MatMuls whose constant weight has fewer than ``min_elements`` entries."""
    from lrt_deploy.graph.index import GraphIndex

    index = GraphIndex(model.graph)
    return sorted(
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and (weight := index.constant(node.input[1])) is not None
        and weight.size < min_elements
    )


def _pack_int4_tables(model: Any) -> None:
    """Store ``GatherBlockQuantized`` INT4 tables as uint8 pairs (low nibble first, offset 8)."""
    import onnx
    from onnx import numpy_helper

    # The ORT format of mobile bundles has no INT4 tensor type; ``bits=4`` reads the same values.
    tables = {node.input[0]: node for node in model.graph.node
              if node.op_type == "GatherBlockQuantized"}
    for tensor in model.graph.initializer:
        if tensor.name not in tables or tensor.data_type != onnx.TensorProto.INT4:
            continue
        values = numpy_helper.to_array(tensor).astype(np.int16) + 8
        if values.shape[-1] % 2:  # the byte width would not say the table's width
            logger.warning("%s has an odd width: kept as INT4 (not loadable as ORT format)",
                           tensor.name)
            continue
        packed = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
        tensor.CopyFrom(numpy_helper.from_array(packed, tensor.name))
        node = tables[tensor.name]
        if not any(attribute.name == "bits" for attribute in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("bits", 4))


def quantize_weights_4bit(
    source: str | Path,
    target: str | Path,
    *,
    block_size: int = 128,
    min_elements: int = 0,
    symmetric: bool = True,
    accuracy_level: int | None = None,
    nodes_to_exclude: Sequence[str] = (),
    embeddings: bool = False,
) -> QuantizationResult:
    """Write ``target``: ``source``'s MatMul weights (and with ``embeddings`` its constant
    Gather tables) as 4-bit blocks of ``block_size``, one scale per block.

    Args:
        source: fp32 ONNX file.
        target: Where the quantised ONNX file goes.
        block_size: Weights per scale; a power of 2, >= 16.
        min_elements: MatMuls whose weight has fewer entries stay float.
        symmetric: Symmetric blocks (no zero point).
        accuracy_level: ``MatMulNBits`` compute type on CPU (4: int8 activations; None: float).
        nodes_to_exclude: Node names kept in float.
        embeddings: Quantise constant Gather tables, in blocks along the hidden dimension.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    check_block_size(block_size)
    model = onnx.load(str(source))
    excluded = sorted({*nodes_to_exclude, *_small_matmuls(model, min_elements)})
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=symmetric,
        accuracy_level=accuracy_level, nodes_to_exclude=excluded,
        **({"op_types_to_quantize": ("MatMul", "Gather"),
            "quant_axes": (("MatMul", 0), ("Gather", 1))} if embeddings else {}),
    )
    # ORT's quantisers log hints on the root logger; its Gather path divides all-zero blocks
    # (a padding row) by a zero scale before np.where discards the result.
    with quiet_loggers(""), np.errstate(divide="ignore", invalid="ignore"):
        quantizer.process()
    if embeddings:
        _pack_int4_tables(quantizer.model.model)
    quantizer.model.save_model_to_file(str(target))
    result = quantization_result(
        source, target, mode="weight-only", per_channel=False, weight_type="int4",
        excluded_nodes=excluded,
        settings={"block_size": block_size, "symmetric": symmetric,
                  "accuracy_level": accuracy_level, "min_elements": min_elements,
                  "embeddings": embeddings},
    )
    logger.info("quantised weights to 4 bits (block %d): %s", block_size, result.quantized_ops)
    return result


def _dequantize_weights(model: Any, min_elements: int) -> int:
    """Store the Attention and Gather weights of ``model`` int8 behind a ``DequantizeLinear``."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    quantized: dict[str, tuple[str, str]] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        rule = _DEQUANTIZED_WEIGHTS.get((node.domain or "", node.op_type))
        slot = rule[0] if rule else len(node.input)
        weight = initializers.get(node.input[slot]) if slot < len(node.input) else None
        if (rule is None or weight is None or weight.data_type != onnx.TensorProto.FLOAT
                or len(weight.dims) != 2 or int(np.prod(weight.dims)) < min_elements):
            new_nodes.append(node)
            continue
        _, weight_axis, dq_axis = rule
        name = weight.name
        if name not in quantized:
            codes, scale = symmetric_int8(numpy_helper.to_array(weight), k_axis=1 - weight_axis)
            quantized[name] = (f"{name}_int8", f"{name}_int8_scale")
            graph.initializer.append(numpy_helper.from_array(codes, quantized[name][0]))
            graph.initializer.append(numpy_helper.from_array(scale.reshape(-1),
                                                             quantized[name][1]))
        q_name, s_name = quantized[name]
        rewritten = onnx.NodeProto()
        rewritten.CopyFrom(node)
        if node.op_type == "Gather":
            rewritten.input[slot] = q_name
            rewritten.output[0] = f"{node.output[0]}_int8"
            new_nodes += [rewritten, helper.make_node(
                "DequantizeLinear", [rewritten.output[0], s_name], [node.output[0]],
                name=f"{node.name}_dequantize", axis=dq_axis,
            )]
        else:
            dequantized = f"{node.name}_{name}_dequantized"
            rewritten.input[slot] = dequantized
            new_nodes += [helper.make_node(
                "DequantizeLinear", [q_name, s_name], [dequantized],
                name=f"{node.name}_weight_dequantize", axis=dq_axis,
            ), rewritten]
    # The fp32 originals go once nothing reads them any more.
    used = {name for node in new_nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return len(quantized)


def quantize_weights_int8(
    source: str | Path,
    target: str | Path,
    *,
    block_size: int = 128,
    min_elements: int = 1024,
) -> QuantizationResult:
    """Write ``target``: ``source``'s MatMul weights as 8-bit ``MatMulNBits`` (float compute) and
    its Attention and Gather weights int8 per column behind ``DequantizeLinear``.

    No activation is rounded, so two onnxruntime builds differ by float rounding only.

    Args:
        source: fp32 ONNX file.
        target: Where the quantised ONNX file goes.
        block_size: MatMul weights per scale; a power of 2, >= 16.
        min_elements: Weights with fewer entries stay fp32.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    check_block_size(block_size)
    model = onnx.load(str(source))
    small = _small_matmuls(model, min_elements)
    # accuracy_level None: the kernel computes in float (4 would quantise activations again).
    quantizer = MatMulNBitsQuantizer(
        model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=None,
        nodes_to_exclude=small,
    )
    with quiet_loggers(""):  # ORT's quantisers log hints on the root logger
        quantizer.process()
    model = quantizer.model.model
    dequantized = _dequantize_weights(model, min_elements)
    onnx.save(model, str(target))
    result = quantization_result(
        source, target, mode="weight-only", per_channel=True, weight_type="int8",
        excluded_nodes=small,
        settings={"block_size": block_size, "min_elements": min_elements,
                  "dequantized_weights": dequantized},
    )
    logger.info("quantised weights to int8 (weight-only): %s", result.quantized_ops)
    return result


@dataclass(frozen=True)
class Int8WeightOnlyPass:
    """Graph pass: :func:`quantize_weights_int8` with its defaults."""

    name: ClassVar[str] = "int8-weight-only"

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Quantise ``model``'s weights into ``context.output``."""
        context.progress(f"quantising {context.label} weights to int8 (weight-only)")
        result = quantize_weights_int8(model, context.output)
        return PassResult(self.name, context.output, result.to_dict())


@dataclass(frozen=True)
class Int4WeightOnlyPass:
    """Graph pass: :func:`quantize_weights_4bit` in blocks of ``block``."""

    name: ClassVar[str] = "int4-weight-only"
    block: int = 32
    embeddings: bool = True

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Quantise ``model``'s weights into ``context.output``."""
        tables = " and embedding tables (GatherBlockQuantized)" if self.embeddings else ""
        context.progress(f"quantising {context.label} to 4-bit weights (MatMulNBits{tables}, "
                         f"block {self.block})")
        result = quantize_weights_4bit(model, context.output, block_size=self.block,
                                       embeddings=self.embeddings)
        return PassResult(self.name, context.output, result.to_dict())
