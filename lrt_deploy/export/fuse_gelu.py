"""Fuse the erf form of GELU, ``x * 0.5 * (1 + erf(x / sqrt(2)))``, into ``com.microsoft.Gelu``.

Why our own pass: ONNX Runtime's built-in GeluFusion (``extended`` level) expects
``Mul(x, Add(1, Erf))`` followed by ``Mul(0.5)``; the dynamo exporter writes ``Mul(0.5, Add)``
first and ``Mul(x, ...)`` last, so on all-MiniLM-L6-v2 it fused 0 of 6 GELUs. Once the node is
``Gelu``, ORT's BiasGeluFusion folds the preceding bias ``Add`` into ``BiasGelu``; that works the
same whether the ``Add`` follows one dense MatMul or the decoder MatMul of a low-rank pair.
"""

from __future__ import annotations

import logging
import math

from lrt_deploy.export.graph_index import GraphIndex

__all__ = ["fuse_gelu"]

logger = logging.getLogger(__name__)

_TOLERANCE = 1e-4


def _close(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= _TOLERANCE * max(1.0, abs(expected))


def fuse_gelu(model: object) -> int:
    """Replace every erf-GELU subgraph of ``model`` (an ``onnx.ModelProto``, in place) by one
    ``Gelu`` node. Returns how many were fused."""
    from onnx import helper

    graph = model.graph
    index = GraphIndex(graph)
    fused = 0
    for erf in [node for node in graph.node if node.op_type == "Erf"]:
        match = _match(index, erf)
        if match is None:
            continue
        source, last = match
        node = helper.make_node(
            "Gelu", [source], list(last.output), name=f"{erf.name}_Gelu", domain="com.microsoft"
        )
        index.replace_node(last, node)
        fused += 1
    if fused:
        index.finish_contrib_fusion(model)
    logger.info("fused %d GELUs", fused)
    return fused


def _other_input(node: object, name: str) -> str | None:
    if len(node.input) != 2 or name not in node.input:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _match(index: GraphIndex, erf: object) -> tuple[str, object] | None:
    """``(x, last node)`` when ``erf`` is the core of ``0.5 * x * (1 + erf(x / sqrt 2))``."""
    scale = index.producer.get(erf.input[0])
    if scale is None or scale.op_type not in ("Div", "Mul"):
        return None
    factor = index.scalar(scale.input[1])
    expected = math.sqrt(2.0) if scale.op_type == "Div" else 1.0 / math.sqrt(2.0)
    if not _close(factor, expected):
        return None
    x = scale.input[0]
    plus_one = index.only_consumer(erf.output[0])
    if plus_one is None or plus_one.op_type != "Add":
        return None
    if not _close(index.scalar(_other_input(plus_one, erf.output[0]) or ""), 1.0):
        return None
    first = index.only_consumer(plus_one.output[0])
    if first is None or first.op_type != "Mul":
        return None
    other = _other_input(first, plus_one.output[0])
    if other is None:
        return None
    if _close(index.scalar(other), 0.5) or other == x:
        # 0.5 * (1 + erf) then * x, or x * (1 + erf) then * 0.5
        last = index.only_consumer(first.output[0])
        if last is None or last.op_type != "Mul":
            return None
        wanted = x if other != x else None
        rest = _other_input(last, first.output[0])
        if rest is None:
            return None
        if wanted is not None and rest != wanted:
            return None
        if wanted is None and not _close(index.scalar(rest), 0.5):
            return None
        return x, last
    half = index.producer.get(other)  # (0.5 * x) * (1 + erf)
    if half is None or half.op_type != "Mul" or x not in half.input:
        return None
    if not _close(index.scalar(_other_input(half, x) or ""), 0.5):
        return None
    return x, first
