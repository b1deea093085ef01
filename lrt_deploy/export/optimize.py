"""Offline ONNX Runtime graph optimisation, with what it fused counted for the report."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrt_deploy.graph.ops import count_changes, op_counts

__all__ = ["OptimizationResult", "optimize_graph"]

logger = logging.getLogger(__name__)

_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}


@dataclass
class OptimizationResult:
    """What one optimisation pass did."""

    level: str
    nodes_before: int
    nodes_after: int
    changes: dict[str, int] = field(default_factory=dict)
    contrib_ops: frozenset[str] = frozenset()

    @property
    def fused(self) -> dict[str, int]:
        """ONNX Runtime's fused kernels the pass created (com.microsoft ops such as
        SkipLayerNormalization, FusedMatMul); plain ONNX ops it added (e.g. shape Gathers) are
        only in ``changes``."""
        return {op: n for op, n in self.changes.items() if n > 0 and op in self.contrib_ops}

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "op_changes": self.changes,
            "fused": self.fused,
        }


def _contrib_op_types(path: str | Path) -> frozenset[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return frozenset(n.op_type for n in model.graph.node if n.domain == "com.microsoft")


def optimize_graph(
    source: str | Path, target: str | Path, level: str = "extended"
) -> OptimizationResult:
    """Optimise ``source`` with ONNX Runtime and save the result to ``target``.

    ``extended`` adds ORT's transformer fusions (SkipLayerNormalization, FusedMatMul, Gelu, ...).
    ``all`` is refused: it adds layout transforms tuned to this machine's CPU, which would make
    the saved graph non-portable.

    Args:
        source: ONNX file.
        target: Where the optimised ONNX file goes.
        level: ``basic`` or ``extended``.

    Returns:
        Node counts before/after and per-op changes.
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
    result = OptimizationResult(
        level=level,
        nodes_before=sum(before.values()),
        nodes_after=sum(after.values()),
        changes=count_changes(before, after),
        contrib_ops=_contrib_op_types(target),
    )
    logger.info("optimised (%s): %d -> %d nodes, fused %s", level, result.nodes_before,
                result.nodes_after, result.fused)
    return result
