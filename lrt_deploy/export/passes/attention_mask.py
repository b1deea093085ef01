"""Feed fused attention the padding mask itself instead of the additive bias the exporter built.

onnxscript's rewriter leaves the padding mask as a ~20-node subgraph computing a float bias
``0 / -3.4e38`` passed as ``attention_bias``; ONNX Runtime's dynamic quantiser cannot make
``QAttention`` of such a node (it reads only ``mask_index`` and refuses ``qkv_hidden_sizes``).
Here the bias becomes ``mask_index`` = the int32 ``(batch, sequence)`` 0/1 mask, and equal
``qkv_hidden_sizes`` are dropped. The bias is replaced only when running its subgraph on a probe
mask with padding gives "0 on kept keys, very negative on padded keys" for every query and head,
so causal or sliding-window biases are left alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from lrt_deploy.graph.index import GraphIndex

if TYPE_CHECKING:
    import onnx

__all__ = ["attention_mask_to_index"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"
# Input positions: Attention(input, weights, bias, mask_index, past, attention_bias) and
# MultiHeadAttention(query, key, value, bias, key_padding_mask, attention_bias).
_MASK_SLOT = {"Attention": 3, "MultiHeadAttention": 4}
_BIAS_SLOT = 5
# A masked key's bias must be at least this negative for softmax to give it ~0 weight.
_MASKED = -1e4
_PROBE = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int64)


# Hand-written, not a rewrite rule: whether a bias is a padding mask is decided once per graph by
# running its subgraph in onnxruntime, and all attention nodes then share one Cast of the mask.
def attention_mask_to_index(model: onnx.ModelProto) -> int:
    """Rewrite the fused attention nodes of ``model`` (after ``optimize_for_ort``) in place to
    read the padding mask directly; returns how many were rewritten."""
    from onnx import helper

    index = GraphIndex(model.graph)
    nodes = [
        node for node in model.graph.node
        if node.domain == _MS and node.op_type in _MASK_SLOT
    ]
    for node in nodes:
        sizes = index.attribute(node, "qkv_hidden_sizes")
        if sizes is not None and len(set(sizes)) == 1:
            for position, attr in enumerate(node.attribute):
                if attr.name == "qkv_hidden_sizes":
                    del node.attribute[position]
                    break
    candidates = [
        node for node in nodes
        if len(node.input) > _BIAS_SLOT and node.input[_BIAS_SLOT]
        and not _has_input(node, _MASK_SLOT[node.op_type])
    ]
    biases = sorted({node.input[_BIAS_SLOT] for node in candidates})
    if not biases:
        return 0
    mask_input = _padding_mask_input(model, biases)
    if mask_input is None:
        logger.info("attention bias is not a plain padding mask: left as it is")
        return 0
    mask_index = f"{mask_input}_as_int32"
    cast = helper.make_node(
        "Cast", [mask_input], [mask_index], name=f"{mask_input}_to_int32", to=6  # INT32
    )
    model.graph.node.insert(0, cast)
    for node in candidates:
        slot = _MASK_SLOT[node.op_type]
        inputs = list(node.input) + [""] * max(0, slot + 1 - len(node.input))
        inputs[slot], inputs[_BIAS_SLOT] = mask_index, ""
        while inputs and not inputs[-1]:
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
    GraphIndex(model.graph).remove_dead_nodes()
    logger.info("attention reads the padding mask '%s' directly: %d nodes", mask_input,
                len(candidates))
    return len(candidates)


def _padding_mask_input(model: onnx.ModelProto, biases: list[str]) -> str | None:
    """The graph input whose 0/1 values are exactly what every bias in ``biases`` encodes."""
    import onnx
    import onnxruntime as ort

    integer = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if not inputs or any(
        value.type.tensor_type.elem_type not in integer
        or len(value.type.tensor_type.shape.dim) != 2
        for value in inputs
    ):
        return None  # only text models fed (batch, sequence) integer tensors are probed
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(_unknown_output(name) for name in biases)
    GraphIndex(probe.graph).remove_dead_nodes()  # run only what computes the biases
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception:  # noqa: BLE001 - a graph we cannot probe is left unchanged
        logger.debug("cannot probe the attention bias", exc_info=True)
        return None
    for candidate in inputs:
        feeds = {}
        for value in inputs:
            int32 = value.type.tensor_type.elem_type == onnx.TensorProto.INT32
            dtype = np.int32 if int32 else np.int64
            values = _PROBE if value.name == candidate.name else np.zeros_like(_PROBE)
            feeds[value.name] = values.astype(dtype)
        try:
            outputs = session.run(None, feeds)
        except Exception:  # noqa: BLE001 - zeros may be invalid for some input; try the next
            continue
        if all(_is_padding_bias(np.asarray(bias)) for bias in outputs):
            return candidate.name
    return None


def _has_input(node: onnx.NodeProto, slot: int) -> bool:
    return len(node.input) > slot and bool(node.input[slot])


def _unknown_output(name: str) -> onnx.ValueInfoProto:
    """A graph output of unknown type and shape named ``name``."""
    from onnx import ValueInfoProto

    value = ValueInfoProto()
    value.name = name
    return value


def _is_padding_bias(bias: np.ndarray) -> bool:
    """True when ``bias`` (broadcastable to batch, heads, query, key) is 0 on kept keys and
    very negative on padded keys of :data:`_PROBE`, for every head and query."""
    if bias.ndim != 4 or bias.shape[0] != _PROBE.shape[0] or bias.shape[-1] != _PROBE.shape[1]:
        return False
    keep = _PROBE.astype(bool)[:, None, None, :]
    kept = np.where(keep, bias, 0.0)
    padded = np.where(keep, _MASKED - 1.0, bias)
    return bool(np.all(kept == 0.0) and np.all(padded <= _MASKED))
