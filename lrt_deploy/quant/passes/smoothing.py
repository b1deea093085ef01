"""Outlier-channel smoothing before dynamic int8.

ONNX Runtime's dynamic int8 rounds each MatMul's input with ONE scale per tensor
(``DynamicQuantizeLinear``). Trained transformers feed some MatMuls activations where a few
channels reach 10-50x the others (all-mpnet-base-v2: channel 288 of block 7's GELU output
peaks at 100 where the median channel peaks at 1.7, mostly on a few tokens); the int8 step
that must cover them rounds every other channel coarsely, and plain int8 drops that model's
sentence embeddings to ~0.92 mean cosine. Keeping whole MatMuls fp32 (``--exclude-sensitive``)
repairs it at 1.8x the size.

This pass moves the range instead, as SmoothQuant does: for an input whose channel ``j``
peaks above ``ratio`` times the median channel's peak on calibration data, ``x_j`` is divided
by ``s_j`` (one ``Mul`` per input tensor, shared by the MatMuls reading it) and row ``j`` of
each weight reading it is multiplied by ``s_j``, so the float product is unchanged and the
channel now peaks near ``target`` times the median (``s_j`` is a power of two: the rule,
:func:`lrt_deploy.quant.outliers.outlier_scales`, is shared with the healing loop's
simulation of this export). Only outlier channels move (``s`` is 1 elsewhere), so the weights'
per-column int8 scales barely change. ORT's own SmoothQuant is
for static QDQ only and needs Intel's neural-compressor; this is the dynamic-int8 form.

The defaults (``ratio`` 8, ``target`` 3) were chosen on ``heldout.txt`` with all-mpnet-base-v2
and checked on all-MiniLM-L6-v2 and on the other-domain held-out text (see the README).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.graph.ops import INLINE_LIMIT
from lrt_deploy.quant.outliers import (
    CALIBRATION_ROWS,
    OUTLIER_RATIO,
    TARGET_RATIO,
    channel_peak,
    check_thresholds,
    outlier_scales,
)

__all__ = [
    "OUTLIER_RATIO", "TARGET_RATIO", "SmoothingResult", "input_channel_peaks",
    "smooth_outlier_channels",
]

logger = logging.getLogger(__name__)

# Op types whose input 0 is an activation and input 1 a constant (in x out) weight; the
# packed-QKV Attention's weight rows are its input channels too.
_WEIGHTED_OPS = ("MatMul", "Attention")


@dataclass
class SmoothingResult:
    """What :func:`smooth_outlier_channels` changed.

    Attributes:
        nodes: Names of the MatMul/Attention nodes whose weight rows were scaled.
        inputs: Activation tensors given a ``Mul`` (one per tensor, shared by its readers).
        channels: Outlier channels scaled, over all those inputs.
        largest_scale: The largest factor a channel was divided by.
        ratio: The outlier threshold used (multiple of the median channel peak).
        target: The peak outlier channels were brought to (multiple of the median).
        rows: Calibration rows the channel peaks were measured on.
        skipped: Why nothing was measured (no calibration data), or ``None``.
    """

    nodes: list[str] = field(default_factory=list)
    inputs: int = 0
    channels: int = 0
    largest_scale: float = 1.0
    ratio: float = OUTLIER_RATIO
    target: float = TARGET_RATIO
    rows: int = 0
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "inputs": self.inputs, "channels": self.channels,
                "largest_scale": self.largest_scale, "ratio": self.ratio,
                "target": self.target, "rows": self.rows, "skipped": self.skipped}


def _weighted_nodes(model: Any) -> list[tuple[Any, np.ndarray]]:
    from lrt_deploy.graph.index import GraphIndex

    index = GraphIndex(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2:
            continue
        if node.op_type == "MatMul" and len(node.input) != 2:
            continue
        weight = index.constant(node.input[1])
        if (weight is not None and weight.ndim == 2
                and np.issubdtype(weight.dtype, np.floating)):
            found.append((node, weight))
    return found


def _used_names(graph: Any) -> set[str]:
    """Every tensor name read by a node (subgraphs included) or returned by the graph."""
    used = {value.name for value in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs]:
                used |= _used_names(subgraph)
    return used


def input_channel_peaks(
    model: Any,
    calibration: Iterable[Mapping[str, np.ndarray]],
    names: list[str],
    *,
    max_rows: int = CALIBRATION_ROWS,
) -> tuple[dict[str, np.ndarray], int]:
    """Per channel (last axis), the largest ``|x|`` of each tensor in ``names`` over the
    calibration rows, run one row at a time. Padded tokens (``attention_mask`` 0) are left out
    when the tensor's leading axes are the mask's.

    Args:
        model: An ``onnx.ModelProto`` (not modified).
        calibration: Named numpy input batches.
        names: Intermediate tensors to measure.
        max_rows: Rows read from the calibration batches.

    Returns:
        ``{name: peaks}`` and the number of rows run.
    """
    import onnx
    from onnx import TensorProto, helper

    from lrt_deploy.graph.ops import cpu_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {value.name for value in probe.graph.output}
    for name in names:
        if name not in outputs:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                    None))
    with tempfile.TemporaryDirectory(prefix="lrt-smooth-") as scratch:
        session = cpu_session(probe, scratch)
        del probe
        inputs = [value.name for value in session.get_inputs()]
        peaks: dict[str, np.ndarray] = {}
        rows = 0
        for batch in calibration:
            arrays = {name: np.asarray(batch[name]) for name in inputs}
            for row in range(len(arrays[inputs[0]])):
                feed = {name: array[row:row + 1] for name, array in arrays.items()}
                mask = feed.get("attention_mask")
                for name, value in zip(names, session.run(names, feed), strict=True):
                    peak = channel_peak(value, mask)
                    peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
                rows += 1
                if rows >= max_rows:
                    return peaks, rows
    return peaks, rows


def smooth_outlier_channels(
    source: str | Path,
    target: str | Path,
    calibration: Iterable[Mapping[str, np.ndarray]],
    *,
    ratio: float = OUTLIER_RATIO,
    target_ratio: float = TARGET_RATIO,
    max_rows: int = CALIBRATION_ROWS,
) -> SmoothingResult:
    """Scale the outlier input channels of every MatMul/Attention with a constant weight into
    its weight rows (see the module docstring); the float model's outputs are unchanged up to
    rounding. Writes ``target`` (a copy of ``source`` when nothing is an outlier).

    Args:
        source: fp32 ONNX file (optimised or not).
        target: Where the smoothed fp32 ONNX file goes (external weights beside it when large).
        calibration: Named numpy input batches.
        ratio: Outlier threshold, as a multiple of the median channel's peak.
        target_ratio: The peak outlier channels are brought to, same unit (< ``ratio``).
        max_rows: Calibration rows to measure on.

    Returns:
        What was scaled.
    """
    import onnx
    from onnx import helper, numpy_helper

    check_thresholds(ratio, target_ratio)
    model = onnx.load(str(source))
    weighted = _weighted_nodes(model)
    result = SmoothingResult(ratio=ratio, target=target_ratio)
    names = sorted({node.input[0] for node, _ in weighted})
    peaks, result.rows = (input_channel_peaks(model, calibration, names, max_rows=max_rows)
                          if names else ({}, 0))
    scales = {name: scale for name, peak in peaks.items()
              if (scale := outlier_scales(peak, ratio, target_ratio)) is not None}
    graph = model.graph
    smoothed: dict[str, str] = {}
    new_nodes, new_inits = [], []
    weights = {id(node): weight for node, weight in weighted}
    for node in graph.node:
        weight = weights.get(id(node))
        scale = scales.get(node.input[0]) if weight is not None else None
        if scale is None or scale.shape[0] != weight.shape[0]:
            new_nodes.append(node)
            continue
        source_name = node.input[0]
        if source_name not in smoothed:
            tag = f"lrt_smooth_{len(smoothed)}"
            smoothed[source_name] = f"{tag}_x"
            new_inits.append(numpy_helper.from_array((1.0 / scale).astype(np.float32),
                                                     f"{tag}_inverse"))
            new_nodes.append(helper.make_node("Mul", [source_name, f"{tag}_inverse"],
                                              [f"{tag}_x"], name=tag))
            result.channels += int((scale != 1).sum())
            result.largest_scale = max(result.largest_scale, float(scale.max()))
        # A new initializer per node: a weight tied to another node keeps its values there.
        rows = f"{node.input[1]}_smoothed_{len(result.nodes)}"
        new_inits.append(numpy_helper.from_array(
            (weight * scale[:, None]).astype(weight.dtype), rows))
        node.input[0], node.input[1] = smoothed[source_name], rows
        new_nodes.append(node)
        result.nodes.append(node.name or node.output[0])
    result.inputs = len(smoothed)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    used = _used_names(graph)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if model.ByteSize() > INLINE_LIMIT:
        onnx.save(model, str(target), save_as_external_data=True,
                  location=Path(target).name + ".data")
    else:
        onnx.save(model, str(target))
    logger.info("smoothed %d outlier channels on %d inputs (%d nodes, largest scale %.1f)",
                result.channels, result.inputs, len(result.nodes), result.largest_scale)
    return result
