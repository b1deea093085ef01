"""Fuse each self-attention subgraph into one ``com.microsoft.MultiHeadAttention`` node.

Why our own pass: ONNX Runtime's transformer fuser (``onnxruntime.transformers.optimizer``)
matches the attention of the TorchScript exporter. On the graph that the dynamo exporter writes
for BERT-style models it finds no attention at all (all-MiniLM-L6-v2: 0 of 6 layers), because the
decomposed ``scaled_dot_product_attention`` differs from its patterns in three ways: the scale is
split into two ``Mul`` nodes (``sqrt(1/sqrt(d))`` on Q and on K) instead of one after ``Q @ K^T``;
K is transposed by a ``Reshape -> Transpose(0,2,1) -> Reshape`` sequence instead of one
``Transpose(0,2,3,1)``; and the softmax is followed by ``IsNaN -> Where`` (zeroing rows that are
fully masked).

Why ``MultiHeadAttention`` rather than ``Attention``: ``Attention`` takes one packed dense QKV
weight, so a low-rank (LRT) model would have to multiply its factors back together. The
``MultiHeadAttention`` node starts after the projections: Q, K and V are computed by whatever the
graph has (one MatMul when dense, an encoder MatMul then a decoder MatMul when low-rank), so the
same pass fuses both. Constant Q/K/V biases move into the node (its ``bias`` input).

A Linformer attention whose sequence projection is shared by the heads
(``LinformerSelfAttention`` with ``share="headwise"``, ``"kv"`` or ``"layerwise"``) matches too:
it projects keys and values to ``k`` rows before the head split, so the node is a
MultiHeadAttention whose keys and values have ``k`` rows instead of ``seq``.

The additive mask the graph computes (``[batch, 1, seq, seq]``, 0 or the float minimum) is passed
as ``attention_bias`` unchanged, so any mask the model builds keeps its meaning. Rows whose keys
are all masked get uniform weights rather than the zeros of the ``IsNaN -> Where`` they replace
(the mask uses the float minimum, not ``-inf``, so the original graph never produced NaN there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from lrt_deploy.export.graph_index import GraphIndex

__all__ = ["fuse_attention"]

logger = logging.getLogger(__name__)

_HEAD_SPLIT = [0, 2, 1, 3]


@dataclass
class _Match:
    query: str
    key: str
    value: str
    bias: str
    output_node: object  # the Reshape merging heads, replaced by the fused node
    scale: float
    biases: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    projections: tuple[str, str, str] | None = None


def fuse_attention(model: object, *, num_heads: int, hidden_size: int) -> int:
    """Replace every matched attention subgraph of ``model`` (in place) by MultiHeadAttention.

    Args:
        model: An ``onnx.ModelProto``.
        num_heads: Attention heads per layer (12 for MiniLM-L6).
        hidden_size: Model width (384 for MiniLM-L6); checked against the graph's head split.

    Returns:
        How many attention layers were fused.
    """
    from onnx import helper, numpy_helper

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    graph = model.graph
    index = GraphIndex(graph)
    head_size = hidden_size // num_heads
    fused = 0
    for softmax in [node for node in graph.node if node.op_type == "Softmax"]:
        match = _match(index, softmax, num_heads, head_size)
        if match is None:
            continue
        # MultiHeadAttention inputs: query, key, value, bias, key_padding_mask, attention_bias.
        inputs = [match.query, match.key, match.value, "", "", match.bias]
        if match.biases is not None and match.projections is not None:
            name = f"{softmax.name}_qkv_bias"
            graph.initializer.append(
                numpy_helper.from_array(np.concatenate(match.biases).astype(np.float32), name)
            )
            inputs[:4] = [*match.projections, name]
        while inputs and not inputs[-1]:
            inputs.pop()
        node = helper.make_node(
            "MultiHeadAttention",
            inputs,
            list(match.output_node.output),
            name=f"{softmax.name}_MultiHeadAttention",
            domain="com.microsoft",
            num_heads=num_heads,
            scale=match.scale,
        )
        index.replace_node(match.output_node, node)
        fused += 1
    if fused:
        index.finish_contrib_fusion(model)
    logger.info("fused %d attention layers into MultiHeadAttention", fused)
    return fused


def _strip_scalar_scales(index: GraphIndex, name: str) -> tuple[str, float]:
    """Walk up through Mul/Div by a scalar constant; return the tensor above and the scale."""
    scale = 1.0
    while True:
        node = index.producer.get(name)
        if node is None or node.op_type not in ("Mul", "Div") or index.only_consumer(name) is None:
            return name, scale
        constants = [index.scalar(i) for i in node.input]
        if node.op_type == "Mul" and constants[0] is not None:
            scale, name = scale * constants[0], node.input[1]
        elif constants[1] is not None:
            factor = constants[1] if node.op_type == "Mul" else 1.0 / constants[1]
            scale, name = scale * factor, node.input[0]
        else:
            return name, scale


def _is_transpose(node: object | None, perm: list[int], index: GraphIndex) -> bool:
    return (
        node is not None
        and node.op_type == "Transpose"
        and list(index.attribute(node, "perm", [])) == perm
    )


def _head_split_source(
    index: GraphIndex, reshape: object | None, num_heads: int, head_size: int
) -> str | None:
    """The 3-D tensor ``[batch, seq, hidden]`` that ``reshape`` splits into heads, if it does."""
    if reshape is None or reshape.op_type != "Reshape":
        return None
    shape = _shape_values(index, reshape.input[1])
    if shape is None or len(shape) != 4:
        return None
    heads, size = shape[2], shape[3]
    if size not in (head_size, None) or heads not in (num_heads, -1, None):
        return None
    if size is None and heads is None:
        return None
    return reshape.input[0]


def _shape_values(index: GraphIndex, name: str) -> list[int | None] | None:
    """A Reshape target as a list (``None`` for entries only known at run time)."""
    value = index.constant(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = index.producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    values: list[int | None] = []
    for part in node.input:
        constant = index.constant(part)
        if constant is None:
            values.append(None)  # a runtime dimension; assume one element (batch or sequence)
        else:
            values.extend(int(v) for v in constant.reshape(-1))
    return values


def _query_source(index: GraphIndex, name: str, num_heads: int, head_size: int) -> str | None:
    transpose = index.producer.get(name)
    if not _is_transpose(transpose, _HEAD_SPLIT, index):
        return None
    return _head_split_source(index, index.parent(transpose, 0), num_heads, head_size)


def _key_source(index: GraphIndex, name: str, num_heads: int, head_size: int) -> str | None:
    """Undo the ways exporters write ``K^T`` in ``[batch, heads, head, seq]`` layout."""
    last = index.producer.get(name)
    if _is_transpose(last, [0, 2, 3, 1], index):
        return _head_split_source(index, index.parent(last, 0), num_heads, head_size)
    if _is_transpose(last, [0, 1, 3, 2], index):
        return _query_source(index, last.input[0], num_heads, head_size)
    # dynamo: Transpose(0,2,1,3) -> Reshape [B*N, S, H] -> Transpose(0,2,1) -> Reshape [B,N,H,S]
    if last is None or last.op_type != "Reshape":
        return None
    middle = index.parent(last, 0)
    if not _is_transpose(middle, [0, 2, 1], index):
        return None
    flatten = index.parent(middle, 0)
    if flatten is None or flatten.op_type != "Reshape":
        return None
    return _query_source(index, flatten.input[0], num_heads, head_size)


def _merged_heads(index: GraphIndex, matmul: object) -> object | None:
    """The Reshape turning ``probs @ V`` back into ``[batch, seq, hidden]``."""
    transpose = index.only_consumer(matmul.output[0])
    if not _is_transpose(transpose, _HEAD_SPLIT, index):
        return None
    reshape = index.only_consumer(transpose.output[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    shape = _shape_values(index, reshape.input[1])
    if shape is None or len(shape) != 3:
        return None
    return reshape


def _bias_of(index: GraphIndex, name: str, hidden: int) -> tuple[str, np.ndarray] | None:
    """``(projection, bias)`` when ``name`` is ``projection + constant bias``."""
    add = index.producer.get(name)
    if add is None or add.op_type != "Add":
        return None
    for position in (0, 1):
        bias = index.constant(add.input[position])
        if bias is not None and bias.shape == (hidden,) and bias.dtype == np.float32:
            return add.input[1 - position], bias
    return None


def _match(index: GraphIndex, softmax: object, num_heads: int, head_size: int) -> _Match | None:
    axis = index.attribute(softmax, "axis", -1)
    if axis not in (-1, 3):
        return None
    probs = softmax.output[0]
    readers = index.consumers.get(probs, [])
    # Optional IsNaN -> Where(isnan, 0, probs) after the softmax.
    if len(readers) == 2 and {r.op_type for r in readers} == {"IsNaN", "Where"}:
        where = next(r for r in readers if r.op_type == "Where")
        probs = where.output[0]
        readers = index.consumers.get(probs, [])
    if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[0] != probs:
        return None
    pv = readers[0]
    output_node = _merged_heads(index, pv)
    if output_node is None:
        return None
    value = _query_source(index, pv.input[1], num_heads, head_size)

    scores, scale = softmax.input[0], 1.0
    mask = ""
    add = index.producer.get(scores)
    if add is not None and add.op_type == "Add":
        for position in (0, 1):
            parent = index.parent(add, position)
            if parent is not None and parent.op_type in ("MatMul", "Mul", "Div"):
                scores, mask = add.input[position], add.input[1 - position]
                break
        else:
            return None
        if index.rank(mask) not in (4, None):
            return None
    scores, scale = _strip_scalar_scales(index, scores)
    qk = index.producer.get(scores)
    if qk is None or qk.op_type != "MatMul":
        return None
    query_name, query_scale = _strip_scalar_scales(index, qk.input[0])
    key_name, key_scale = _strip_scalar_scales(index, qk.input[1])
    query = _query_source(index, query_name, num_heads, head_size)
    key = _key_source(index, key_name, num_heads, head_size)
    if query is None or key is None or value is None:
        logger.debug("softmax %s: attention pattern not recognised", softmax.name)
        return None
    match = _Match(query, key, value, mask, output_node, scale * query_scale * key_scale)
    hidden = num_heads * head_size
    biased = [_bias_of(index, name, hidden) for name in (query, key, value)]
    if all(b is not None for b in biased):
        match.projections = tuple(b[0] for b in biased)  # type: ignore[index]
        match.biases = tuple(b[1] for b in biased)  # type: ignore[index]
    return match
