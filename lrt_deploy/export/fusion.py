"""Transformer fusions for the CPU target, for dense and low-rank (LRT) graphs alike.

Order matters:

1. ``fuse_attention`` first, on the exporter's own graph: ORT's ``extended`` level folds the
   Q and K scale ``Mul`` nodes into ``FusedMatMul``, which would hide the scale from the matcher.
2. ``fuse_gelu``: turns the erf GELU into ``Gelu`` so that step 3 can fold its bias.
3. ONNX Runtime's ``extended`` optimisation (portable): SkipLayerNormalization (residual Add +
   LayerNorm), BiasGelu (bias Add + Gelu), constant folding and its other fusions.

Low-rank pairs (``MatMul -> MatMul -> Add``) need nothing special: the attention pass starts
after the projections and the bias folds work on the ``Add`` after the decoder MatMul.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.errors import ExportValidationError
from lrt_deploy.export.external_data import (
    EXTERNAL_DATA_THRESHOLD,
    load_model_proto,
    save_model_proto,
)
from lrt_deploy.export.fuse_attention import fuse_attention
from lrt_deploy.export.fuse_gelu import fuse_gelu
from lrt_deploy.export.graph import count_changes, op_counts
from lrt_deploy.export.optimize import optimize_graph

__all__ = ["FUSED_OP_TYPES", "FusionResult", "fuse_transformer", "max_output_difference"]

logger = logging.getLogger(__name__)

FUSED_OP_TYPES = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "EmbedLayerNormalization",
    "BiasGelu",
    "Gelu",
    "FastGelu",
    "BiasAdd",
    "FusedMatMul",
)


@dataclass
class FusionResult:
    """What :func:`fuse_transformer` did, for the report.

    Attributes:
        nodes_before: Node count of the source graph.
        nodes_after: Node count of the fused graph.
        attention_layers: Attention subgraphs fused into MultiHeadAttention by our pass.
        gelus: GELU subgraphs fused by our pass (before ORT folds their biases).
        fused: Count per fused op type in the result (see :data:`FUSED_OP_TYPES`).
        changes: Per op type, nodes added (+) or removed (-) overall.
        level: ORT optimisation level applied after our passes.
        max_abs_diff: Largest output difference source vs result on the check inputs, if run.
    """

    nodes_before: int
    nodes_after: int
    attention_layers: int
    gelus: int
    fused: dict[str, int] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)
    level: str = "extended"
    max_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "attention_layers": self.attention_layers,
            "gelus": self.gelus,
            "fused": self.fused,
            "op_changes": self.changes,
            "level": self.level,
            "max_abs_diff": self.max_abs_diff,
        }


def fuse_transformer(
    source: str | Path,
    target: str | Path,
    *,
    num_heads: int,
    hidden_size: int,
    attention: bool = True,
    gelu: bool = True,
    level: str = "extended",
    check_inputs: Mapping[str, np.ndarray] | None = None,
    atol: float = 1e-4,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> FusionResult:
    """Fuse attention, GELU, bias and residual LayerNorm subgraphs of an exported transformer.

    Args:
        source: ONNX file as the exporter wrote it (not yet optimised by ORT).
        target: Where the fused graph goes (portable: no machine-specific layouts).
        num_heads: Attention heads per layer.
        hidden_size: Model width; ``hidden_size / num_heads`` must be the head size in the graph.
        attention: Fuse attention into ``com.microsoft.MultiHeadAttention``.
        gelu: Fuse erf GELU into ``com.microsoft.Gelu`` (then ``BiasGelu``).
        level: ORT optimisation applied last: ``basic`` or ``extended``.
        check_inputs: Named numpy inputs; when given, both graphs run on them on CPU and the
            largest output difference is recorded and checked against ``atol``.
        atol: Largest allowed absolute difference on ``check_inputs``.
        external_data_threshold: Weight bytes above which the intermediate graph keeps its
            weights in a side file.

    Returns:
        Counts of fused ops and nodes before/after.

    Raises:
        ExportValidationError: The fused graph differs from the source by more than ``atol``.
    """
    source, target = Path(source), Path(target)
    model = load_model_proto(source)
    layers = fuse_attention(model, num_heads=num_heads, hidden_size=hidden_size) if attention else 0
    gelus = fuse_gelu(model) if gelu else 0
    with tempfile.TemporaryDirectory(prefix="lrt-fusion-") as folder:
        staged = Path(folder) / "fused.onnx"
        save_model_proto(model, staged, threshold=external_data_threshold)
        del model
        optimize_graph(staged, target, level)
    before, after = op_counts(source), op_counts(target)
    result = FusionResult(
        nodes_before=sum(before.values()),
        nodes_after=sum(after.values()),
        attention_layers=layers,
        gelus=gelus,
        fused={op: after[op] for op in FUSED_OP_TYPES if after.get(op)},
        changes=count_changes(before, after),
        level=level,
    )
    if check_inputs is not None:
        result.max_abs_diff = max_output_difference(source, target, check_inputs)
        if not result.max_abs_diff <= atol:
            raise ExportValidationError(
                f"fused graph differs from its source by {result.max_abs_diff:.3g} > atol "
                f"{atol:g}: rerun with attention=False or gelu=False to find the pass at fault"
            )
    logger.info("fused transformer: %d -> %d nodes, %s", result.nodes_before,
                result.nodes_after, result.fused)
    return result


def max_output_difference(
    first: str | Path, second: str | Path, inputs: Mapping[str, np.ndarray]
) -> float:
    """Largest absolute difference over all outputs of two graphs run on CPU on ``inputs``."""
    import onnxruntime as ort

    outputs = []
    for path in (first, second):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [value.name for value in session.get_inputs()]
        outputs.append(session.run(None, {name: inputs[name] for name in names}))
    return max(
        float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))
        for a, b in zip(*outputs, strict=True)
    )
