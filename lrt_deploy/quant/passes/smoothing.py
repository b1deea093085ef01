"""Outlier-channel smoothing before dynamic int8: outlier input channels of each MatMul are
divided by a power of two (one ``Mul`` per input tensor) and the weight rows reading them
multiplied by it, so the float product is unchanged and the per-tensor int8 step of the input
shrinks. The rule is :func:`lrt_deploy.quant.rules.outlier_scales`, shared with the healing
loop's simulation.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lrt_deploy.graph.ops import INLINE_LIMIT, weighted_nodes
from lrt_deploy.graph.passes import PassContext, PassResult
from lrt_deploy.quant.rules import (
    CALIBRATION_ROWS,
    OUTLIER_RATIO,
    TARGET_RATIO,
    channel_peak,
    check_thresholds,
    outlier_scales,
)

__all__ = [
    "OUTLIER_RATIO", "TARGET_RATIO", "SmoothingPass", "SmoothingResult", "input_channel_peaks",
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
        """The manifest's ``smoothing`` record."""
        return {"nodes": list(self.nodes), "inputs": self.inputs, "channels": self.channels,
                "largest_scale": self.largest_scale, "ratio": self.ratio,
                "target": self.target, "rows": self.rows, "skipped": self.skipped}


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
    """Per channel, the peak ``|x|`` of each tensor in ``names`` over the first ``max_rows``
    calibration rows (padded tokens left out), and the rows run."""
    from lrt_deploy.graph.ops import cpu_session, with_outputs

    probe = with_outputs(model, names)
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
    """Write ``target``: ``source`` with the outlier input channels of every MatMul/Attention
    with a constant weight scaled into its weight rows; float outputs are unchanged.

    Args:
        source: fp32 ONNX file.
        target: Where the smoothed fp32 ONNX file goes (external weights beside it when large).
        calibration: Named numpy input batches.
        ratio: Outlier threshold, as a multiple of the median channel's peak.
        target_ratio: Where outlier peaks are brought, same unit (at most ``ratio``).
        max_rows: Calibration rows to measure on.
    """
    import onnx
    from onnx import helper, numpy_helper

    check_thresholds(ratio, target_ratio)
    model = onnx.load(str(source))
    weighted = weighted_nodes(model, _WEIGHTED_OPS)
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


@dataclass(frozen=True)
class SmoothingPass:
    """Graph pass: :func:`smooth_outlier_channels` on the context's calibration batches; without
    any it records why and leaves the graph as it is."""

    name: ClassVar[str] = "smooth"
    record_as: ClassVar[str] = "smoothing"

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Smooth ``model`` into ``context.output``, or return ``model`` when skipped."""
        if not context.calibration:
            result = SmoothingResult(skipped="no calibration data (a model without text "
                                             "inputs needs calibration inputs)")
            context.progress(f"outlier smoothing skipped: {result.skipped}")
            return PassResult(self.name, model, result.to_dict())
        context.progress(f"measuring {context.label}'s MatMul input channels for outliers")
        result = smooth_outlier_channels(model, context.output, context.calibration)
        context.progress(
            f"smoothed {result.channels} outlier channels on {result.inputs} inputs "
            f"({len(result.nodes)} MatMuls)")
        return PassResult(self.name, context.output, result.to_dict())
