"""Offline ONNX Runtime graph optimisation (portable levels only), with what it fused counted."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lrt_deploy.graph.ops import count_changes, op_counts
from lrt_deploy.graph.passes import PassContext, PassResult

__all__ = ["OrtOptimization", "optimize_graph"]

logger = logging.getLogger(__name__)

_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}


@dataclass(frozen=True)
class OrtOptimization:
    """Pass: ONNX Runtime's offline optimisation at ``level`` (``basic`` or ``extended``)."""

    level: str = "extended"
    name = "optimize"

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Optimise ``model`` into ``context.output``; details as :func:`optimize_graph`."""
        context.progress(f"optimising {context.label} graph ({self.level})")
        return optimize_graph(model, context.output, self.level)


def _contrib_op_types(path: str | Path) -> frozenset[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return frozenset(n.op_type for n in model.graph.node if n.domain == "com.microsoft")


def optimize_graph(
    source: str | Path, target: str | Path, level: str = "extended"
) -> PassResult:
    """Optimise ``source`` with ONNX Runtime into ``target``; ``all`` is refused (its layout
    transforms fit only this machine's CPU).

    ``details``: ``level``, ``nodes_before``, ``nodes_after``, ``op_changes`` (per op type,
    added + / removed -) and ``fused`` (the com.microsoft kernels it created and how many).
    """
    import onnxruntime as ort

    if level not in _LEVELS:
        raise ValueError(f"optimization level must be one of {sorted(_LEVELS)}, got {level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    before, after = op_counts(source), op_counts(target)
    changes = count_changes(before, after)
    contrib = _contrib_op_types(target)
    details = {
        "level": level,
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "op_changes": changes,
        "fused": {op: n for op, n in changes.items() if n > 0 and op in contrib},
    }
    logger.info("optimised (%s): %d -> %d nodes, fused %s", level, details["nodes_before"],
                details["nodes_after"], details["fused"])
    return PassResult(OrtOptimization.name, Path(target), details)
