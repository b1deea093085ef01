"""Which MatMuls dynamic int8 hurts most, measured on the model's output.

:func:`lrt_deploy.quant.passes.quantize.find_sensitive_nodes` ranks MatMuls by the noise int8 adds
to each one's own output. That local measure can miss badly: on all-MiniLM's larger sibling
all-mpnet-base-v2, dynamic int8 per channel drops the sentence embeddings to ~0.88 mean
cosine, nearly all of it from the FFN down-projections of blocks 6-10, yet none of those is
among the 4 nodes with the lowest local SQNR, and keeping its 12 worst nodes float still left
0.93. Errors there are amplified by the blocks that follow; a local measure cannot see that.

:func:`rank_int8_damage` measures the effect itself: for each MatMul with a constant 2-D
weight, the cosine of the model's first output to the float model's when that node alone
runs in dynamic int8, rounded as ONNX Runtime's ``quantize_dynamic`` rounds it (the input
through ``DynamicQuantizeLinear``, the weight symmetric int8 per output column or per tensor).
All of it runs in ONE session: every such node becomes an ``If`` between itself and its int8
twin, chosen by one entry of a boolean input, so the N + 1 passes cost N + 1 inferences, not N
quantisations and sessions.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NodeDamage", "rank_int8_damage"]

logger = logging.getLogger(__name__)

MASK_INPUT = "lrt_int8_only"


@dataclass(frozen=True)
class NodeDamage:
    """What dynamic int8 of one MatMul alone does to the model's first output: mean and
    worst cosine of its vectors to the float model's (``cosine_per_row``), on the calibration
    rows."""

    node: str
    mean_cosine: float
    worst_cosine: float

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "mean_cosine": self.mean_cosine,
                "worst_cosine": self.worst_cosine}


def build_probe(model: Any, per_channel: bool = True, weight_grid: str = "pair-safe"
                ) -> list[str]:
    """Give each MatMul with a constant 2-D weight an int8 twin, in place, selected by the
    boolean input :data:`MASK_INPUT` (one entry per node, in the returned order).

    Returns:
        The probed node names; entry i of the mask switches node i to int8.
    """
    from onnx import TensorProto, helper, numpy_helper

    from lrt_deploy.graph.index import GraphIndex
    from lrt_deploy.quant.passes.quantize import symmetric_int8_scale
    from lrt_deploy.quant.rules import pair_safe_scale

    graph = model.graph
    index = GraphIndex(graph)
    nodes: list[Any] = []
    probed: list[str] = []
    extra_inits: list[Any] = []
    for node in graph.node:
        weight = (index.constant(node.input[1])
                  if node.op_type == "MatMul" and len(node.input) == 2 else None)
        if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
            nodes.append(node)
            continue
        i, tag = len(probed), f"lrt_probe_{len(probed)}"
        probed.append(node.name or node.output[0])
        output = node.output[0]
        node.output[0] = f"{tag}_float"
        # The quantiser's symmetric scales: per output column (axis 1 of in x out) or one.
        scale = (pair_safe_scale(weight, 0, per_channel) if weight_grid == "pair-safe" else
                 symmetric_int8_scale(weight.astype(np.float32), 1 if per_channel else None))
        scale = scale.reshape(-1 if per_channel else ()).astype(np.float32)
        extra_inits += [
            numpy_helper.from_array(scale, f"{tag}_w_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{tag}_w_zero"),
            numpy_helper.from_array(np.array(i, np.int64), f"{tag}_index"),
        ]
        axis = {"axis": 1} if per_channel else {}
        int8_branch = helper.make_graph([
            helper.make_node("QuantizeLinear", [node.input[1], f"{tag}_w_scale", f"{tag}_w_zero"],
                             [f"{tag}_wq"], **axis),
            helper.make_node("DequantizeLinear", [f"{tag}_wq", f"{tag}_w_scale",
                                                  f"{tag}_w_zero"], [f"{tag}_w"], **axis),
            helper.make_node("DynamicQuantizeLinear", [node.input[0]],
                             [f"{tag}_xq", f"{tag}_xs", f"{tag}_xz"]),
            helper.make_node("DequantizeLinear", [f"{tag}_xq", f"{tag}_xs", f"{tag}_xz"],
                             [f"{tag}_x"]),
            helper.make_node("MatMul", [f"{tag}_x", f"{tag}_w"], [f"{tag}_int8"]),
        ], f"{tag}_int8", [], [helper.make_tensor_value_info(f"{tag}_int8", TensorProto.FLOAT,
                                                             None)])
        float_branch = helper.make_graph(
            [node], f"{tag}_float", [],
            [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)])
        # If runs only the branch taken: one pass costs one inference, not two.
        nodes += [
            helper.make_node("Gather", [MASK_INPUT, f"{tag}_index"], [f"{tag}_on"]),
            helper.make_node("If", [f"{tag}_on"], [output], then_branch=int8_branch,
                             else_branch=float_branch),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(extra_inits)
    graph.input.append(helper.make_tensor_value_info(MASK_INPUT, TensorProto.BOOL,
                                                     [len(probed)]))
    return probed


def rank_int8_damage(
    source: str | Path,
    calibration: Iterable[Mapping[str, np.ndarray]],
    *,
    per_channel: bool = True,
    weight_grid: str = "pair-safe",
    max_rows: int = 64,
    progress: Any = None,
) -> list[NodeDamage]:
    """Rank the MatMuls with a constant weight by what dynamic int8 of each alone does to the
    model's first output, worst first (see the module docstring).

    Args:
        source: fp32 ONNX file (optimised or not).
        calibration: Named numpy input batches; rows are read until ``max_rows``.
        per_channel: Weight scales per output channel, as the quantiser will use.
        weight_grid: The quantiser's int8 weight grid (``pair-safe`` or ``full-range``).
        max_rows: Calibration rows each pass runs on.
        progress: ``progress(message)`` for a line every 16 nodes, or None.

    Returns:
        One entry per probed MatMul, lowest mean cosine first.
    """
    import onnx

    from lrt_deploy.graph.ops import cpu_session

    model = onnx.load(str(source))
    probed = build_probe(model, per_channel, weight_grid)
    if not probed:
        return []
    with tempfile.TemporaryDirectory(prefix="lrt-int8-probe-") as scratch:
        session = cpu_session(model, scratch)
        del model
        ranked = _rank(session, probed, calibration, max_rows, progress)
    logger.info("int8 damage, worst first: %s", [(d.node, round(d.mean_cosine, 5))
                                                for d in ranked[:8]])
    return ranked


def _rank(session: Any, probed: list[str], calibration: Iterable[Mapping[str, np.ndarray]],
          max_rows: int, progress: Any) -> list[NodeDamage]:
    from lrt_deploy.compress.fidelity import cosine_per_row
    names = [value.name for value in session.get_inputs() if value.name != MASK_INPUT]
    batches, rows = [], 0
    for batch in calibration:
        batches.append({name: np.asarray(batch[name]) for name in names})
        rows += len(batches[-1][names[0]])
        if rows >= max_rows:
            break
    output = session.get_outputs()[0].name

    def run(mask: np.ndarray) -> list[np.ndarray]:
        return [session.run([output], {**b, MASK_INPUT: mask})[0] for b in batches]

    reference = run(np.zeros(len(probed), bool))
    ranked = []
    for i, name in enumerate(probed):
        mask = np.zeros(len(probed), bool)
        mask[i] = True
        cosine = np.concatenate([cosine_per_row(r, o)
                                 for r, o in zip(reference, run(mask), strict=True)])
        ranked.append(NodeDamage(name, float(cosine.mean()), float(cosine.min())))
        if progress is not None and (i + 1) % 16 == 0:
            progress(f"int8 damage measured for {i + 1}/{len(probed)} MatMuls")
    ranked.sort(key=lambda item: (item.mean_cosine, item.worst_cosine))
    return ranked
