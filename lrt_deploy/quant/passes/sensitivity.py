"""Which MatMuls int8 hurts most, measured on the model's output, and the pass that keeps
them float.

For each MatMul with a constant 2-D weight, the probe measures the cosine of the model's first
output to the float model's when that node alone runs in int8, rounded as the quantiser will
round it: the weight on the recipe's int8 grid, the input through ``DynamicQuantizeLinear``
(dynamic int8) or through uint8 over its calibrated range (static int8). Every such node becomes
an ``If`` between itself and its int8 twin, chosen by one entry of a boolean input, so the
N + 1 passes run in one session. A node-local error measure would miss errors that the layers
after a node amplify.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lrt_deploy.graph.ops import weighted_nodes
from lrt_deploy.graph.passes import PassContext, PassResult
from lrt_deploy.metrics import cosine_per_row
from lrt_deploy.quant.rules import int8_weight_scale, uint8_grid

__all__ = [
    "ACTIVATION_ROUNDINGS",
    "MASK_INPUT",
    "ExcludeSensitive",
    "NodeDamage",
    "activation_ranges",
    "build_probe",
    "rank_int8_damage",
]

logger = logging.getLogger(__name__)

MASK_INPUT = "lrt_int8_only"
#: How the probe rounds a MatMul's input: at run time per tensor, or over calibrated ranges.
ACTIVATION_ROUNDINGS = ("dynamic", "static")


@dataclass(frozen=True)
class NodeDamage:
    """Mean and worst cosine of the model's first output to the float model's with one MatMul
    alone in int8."""

    node: str
    mean_cosine: float
    worst_cosine: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"node": self.node, "mean_cosine": self.mean_cosine,
                "worst_cosine": self.worst_cosine}


def activation_ranges(model: Any, calibration: Iterable[Mapping[str, np.ndarray]],
                      names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Smallest and largest value of each tensor in ``names`` over all calibration batches."""
    from lrt_deploy.graph.ops import cpu_session, with_outputs

    names = list(dict.fromkeys(names))
    ranges: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lrt-int8-ranges-") as scratch:
        session = cpu_session(with_outputs(model, names), scratch)
        inputs = [value.name for value in session.get_inputs()]
        for batch in calibration:
            values = session.run(names, {name: np.asarray(batch[name]) for name in inputs})
            for name, value in zip(names, values, strict=True):
                low, high = float(value.min()), float(value.max())
                if name in ranges:
                    low, high = min(low, ranges[name][0]), max(high, ranges[name][1])
                ranges[name] = (low, high)
    return ranges


def _int8_branch(tag: str, node: Any, per_channel: bool,
                 activation: tuple[float, float] | None) -> tuple[Any, list[Any]]:
    """The int8 twin of ``node`` as an ``If`` branch, and the initializers it reads."""
    from onnx import TensorProto, helper, numpy_helper

    x = node.input[0]
    axis = {"axis": 1} if per_channel else {}
    if activation is None:
        rounding = helper.make_node("DynamicQuantizeLinear", [x],
                                    [f"{tag}_xq", f"{tag}_xs", f"{tag}_xz"])
        inits = []
    else:
        scale, zero = uint8_grid(*activation)
        rounding = helper.make_node("QuantizeLinear", [x, f"{tag}_xs", f"{tag}_xz"], [f"{tag}_xq"])
        inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_xs"),
                 numpy_helper.from_array(np.array(zero, np.uint8), f"{tag}_xz")]
    branch = helper.make_graph([
        helper.make_node("QuantizeLinear", [node.input[1], f"{tag}_w_scale", f"{tag}_w_zero"],
                         [f"{tag}_wq"], **axis),
        helper.make_node("DequantizeLinear", [f"{tag}_wq", f"{tag}_w_scale", f"{tag}_w_zero"],
                         [f"{tag}_w"], **axis),
        rounding,
        helper.make_node("DequantizeLinear", [f"{tag}_xq", f"{tag}_xs", f"{tag}_xz"],
                         [f"{tag}_x"]),
        helper.make_node("MatMul", [f"{tag}_x", f"{tag}_w"], [f"{tag}_int8"]),
    ], f"{tag}_int8", [], [helper.make_tensor_value_info(f"{tag}_int8", TensorProto.FLOAT, None)])
    return branch, inits


def build_probe(model: Any, per_channel: bool = True, weight_grid: str = "pair-safe",
                ranges: Mapping[str, tuple[float, float]] | None = None) -> list[str]:
    """Give each probed MatMul of ``model`` an int8 twin in place; returns the probed names.

    Entry i of the boolean input :data:`MASK_INPUT` switches node i to int8. With ``ranges``
    (input tensor -> calibrated (low, high)) inputs round as static int8, else dynamically.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    weights = {node.output[0]: weight for node, weight in weighted_nodes(model)}
    nodes: list[Any] = []
    probed: list[str] = []
    extra_inits: list[Any] = []
    for node in graph.node:
        weight = weights.get(node.output[0]) if node.output else None
        if weight is None:
            nodes.append(node)
            continue
        i, tag = len(probed), f"lrt_probe_{len(probed)}"
        probed.append(node.name or node.output[0])
        scale = int8_weight_scale(weight, weight_grid, 0, per_channel)
        scale = scale.reshape(-1 if per_channel else ())
        int8_branch, inits = _int8_branch(
            tag, node, per_channel, None if ranges is None else ranges[node.input[0]])
        extra_inits += [
            *inits,
            numpy_helper.from_array(scale, f"{tag}_w_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{tag}_w_zero"),
            numpy_helper.from_array(np.array(i, np.int64), f"{tag}_index"),
        ]
        output = node.output[0]
        node.output[0] = f"{tag}_float"
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
    activations: str = "dynamic",
    max_rows: int = 64,
    progress: Any = None,
) -> list[NodeDamage]:
    """Rank the MatMuls with a constant weight by what int8 of each alone does to the model's
    first output, lowest mean cosine first.

    Args:
        source: fp32 ONNX file.
        calibration: Named numpy input batches; static ranges come from all of them, the
            cosines from the first ``max_rows`` rows.
        per_channel: Weight scales per output channel, as the quantiser will use.
        weight_grid: One of :data:`lrt_deploy.quant.rules.INT8_WEIGHT_GRIDS`.
        activations: One of :data:`ACTIVATION_ROUNDINGS` (``static``: uint8 over min/max).
        max_rows: Calibration rows each pass runs on.
        progress: ``progress(line)`` every 16 nodes, or None.
    """
    import onnx

    from lrt_deploy.graph.ops import cpu_session

    if activations not in ACTIVATION_ROUNDINGS:
        raise ValueError(f"activations must be one of {ACTIVATION_ROUNDINGS}, got "
                         f"{activations!r}")
    calibration = list(calibration)
    model = onnx.load(str(source))
    ranges = None
    if activations == "static":
        ranges = activation_ranges(model, calibration,
                                   [node.input[0] for node, _ in weighted_nodes(model)])
    probed = build_probe(model, per_channel, weight_grid, ranges)
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


@dataclass(frozen=True)
class ExcludeSensitive:
    """Graph pass that keeps the graph and puts into ``into`` the ``count`` MatMuls int8 hurts
    most, for the quantisation pass after it to keep float."""

    name: ClassVar[str] = "sensitivity"
    count: int
    into: list[str]
    per_channel: bool = True
    weight_grid: str = "pair-safe"
    activations: str = "dynamic"

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Rank ``model``'s MatMuls on ``context.calibration``; ``model`` is the output."""
        context.progress(
            f"measuring what int8 of each MatMul alone does to {context.label}'s output")
        ranked = rank_int8_damage(model, context.calibration, per_channel=self.per_channel,
                                  weight_grid=self.weight_grid, activations=self.activations,
                                  progress=context.progress)
        worst = ranked[: self.count]
        self.into[:] = [entry.node for entry in worst]
        context.progress(
            f"keeping the {len(worst)} MatMuls int8 hurts most fp32 (alone, mean cosine "
            + ", ".join(f"{entry.mean_cosine:.4f}" for entry in worst) + ")")
        return PassResult(self.name, model, {"ranked": [entry.to_dict() for entry in worst]})
