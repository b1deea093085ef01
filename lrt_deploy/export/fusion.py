"""Transformer fusions for the CPU target, for dense and low-rank (LRT) graphs alike.

Order matters:

1. ``onnxscript``'s ``optimize_for_ort`` on the exporter's own graph: SDPA -> MultiHeadAttention
   -> (dense Q/K/V) packed-QKV ``Attention``, erf GELU -> ``Gelu`` -> ``BiasGelu``, residual Add +
   LayerNorm -> ``SkipLayerNormalization``. On low-rank graphs whose Q/K/V are factor pairs it
   stops at ``MultiHeadAttention`` after the pairs, which is what our former hand-written pass
   produced too (measured on all-MiniLM-L6-v2, see ``benchmarks/bench_fusion.py``).
2. Our :func:`~lrt_deploy.export.fuse_attention.attention_mask_to_index`, for what the library
   leaves: the padding mask as a ~20-node additive-bias subgraph, which also keeps ORT's dynamic
   quantiser from making ``QAttention`` of the packed Attention.
3. ONNX Runtime's ``extended`` optimisation (portable): constant folding (the rewriter packs the
   Q/K/V weights with a ``Concat`` that must become one initializer for the quantiser) and its
   remaining fusions.

Our former passes (attention -> MultiHeadAttention, erf GELU, ~360 lines with their tests'
helpers) were deleted: on all-MiniLM-L6-v2, dense and LRT (svd, rank 0.5 and 0.25), the library
fuses every subgraph they did (attention 6, SkipLayerNormalization 12, BiasGelu 6) and packs
dense Q/K/V as well; nodes 103/115/139 (ours) -> 64/76/118, max |diff| ~1e-7 against the unfused
graph for both, fp32 latency within the noise of a loaded 2-core machine (paired ratio to ours
0.9-1.1 over several interleaved runs). See ``benchmarks/FUSION_INT8.md``. No LRT graph was
found where the library fuses less than our passes did.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.errors import ExportValidationError
from lrt_deploy.export.fuse_attention import attention_mask_to_index
from lrt_deploy.export.optimize import optimize_graph
from lrt_deploy.graph.external_data import (
    EXTERNAL_DATA_THRESHOLD,
    save_model_proto,
)
from lrt_deploy.graph.ops import count_changes, op_counts

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
        attention_layers: Fused attention nodes (Attention or MultiHeadAttention).
        gelus: Fused GELU nodes (BiasGelu or Gelu).
        fused: Count per fused op type in the result (see :data:`FUSED_OP_TYPES`).
        changes: Per op type, nodes added (+) or removed (-) overall.
        level: ORT optimisation level applied after our passes.
        max_abs_diff: Largest output difference source vs result on the check inputs, if run.
        rewrites: What each rule set of ``onnxscript``'s rewriter and our own passes did.
        seconds: Time spent fusing (the ORT pass and the check excluded).
    """

    nodes_before: int
    nodes_after: int
    attention_layers: int
    gelus: int
    fused: dict[str, int] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)
    level: str = "extended"
    max_abs_diff: float | None = None
    rewrites: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

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
            "rewrites": dict(self.rewrites),
        }


def fuse_transformer(
    source: str | Path,
    target: str | Path,
    *,
    num_heads: int,
    hidden_size: int,
    level: str = "extended",
    check_inputs: Mapping[str, np.ndarray] | None = None,
    atol: float = 1e-4,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    pack_qkv: bool = True,
) -> FusionResult:
    """Fuse attention, GELU, bias and residual LayerNorm subgraphs of an exported transformer.

    Args:
        source: ONNX file as the exporter wrote it (not yet optimised by ORT).
        target: Where the fused graph goes (portable: no machine-specific layouts).
        num_heads: Attention heads per layer; fused attention with another head count is an
            error (the rewriter reads it from the graph's reshapes).
        hidden_size: Model width (recorded for the check above; ``hidden_size / num_heads`` is
            the head size).
        level: ORT optimisation applied last: ``basic`` or ``extended``.
        check_inputs: Named numpy inputs; when given, both graphs run on them on CPU and the
            largest output difference is recorded and checked against ``atol``.
        atol: Largest allowed absolute difference on ``check_inputs``.
        external_data_threshold: Weight bytes above which the intermediate graph keeps its
            weights in a side file.
        pack_qkv: Let dense Q/K/V projections become one packed-QKV ``Attention`` (right for
            fp32 and int8, which quantises it as ``QAttention``). False stops at
            ``MultiHeadAttention`` after three MatMuls: ``Attention`` takes its weight as an
            input no 4-bit kernel reads, so 4-bit weight-only quantisation would leave a fifth
            of the model's weights in fp32.

    Returns:
        Counts of fused ops and nodes before/after.

    Raises:
        ExportValidationError: The fused graph differs from the source by more than ``atol``,
            or its attention has another head count than ``num_heads``.
    """
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from lrt_deploy._logs import quiet_loggers

    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
    source, target = Path(source), Path(target)
    started = time.perf_counter()
    model = ir.load(str(source))
    try:
        with quiet_loggers("onnxscript"), _packed_attention(pack_qkv):
            model, counts = optimize_for_ort(model)
    except Exception as exc:  # noqa: BLE001 - a graph the rewriter cannot take still deploys
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        logger.warning("onnxscript's transformer fusion failed (%s): graph left unfused", first)
        model, counts = ir.load(str(source)), {"failed": 1}
    proto = ir.serde.serialize_model(model)
    del model
    rewrites = {name: count for name, count in counts.items() if count}
    rewrites["attention_mask_to_index"] = attention_mask_to_index(proto)
    heads = {
        _attribute(node, "num_heads") for node in proto.graph.node
        if node.op_type in ("Attention", "MultiHeadAttention")
    }
    if heads - {num_heads}:
        raise ExportValidationError(
            f"fused attention has {sorted(heads)} heads, the model config says {num_heads}: "
            "check the config's num_attention_heads, or export with fusion off"
        )
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="lrt-fusion-") as folder:
        staged = Path(folder) / "fused.onnx"
        save_model_proto(proto, staged, threshold=external_data_threshold)
        del proto
        optimize_graph(staged, target, level)
    before, after = op_counts(source), op_counts(target)
    result = FusionResult(
        nodes_before=sum(before.values()),
        nodes_after=sum(after.values()),
        attention_layers=after["Attention"] + after["MultiHeadAttention"],
        gelus=after["BiasGelu"] + after["Gelu"],
        fused={op: after[op] for op in FUSED_OP_TYPES if after.get(op)},
        changes=count_changes(before, after),
        level=level,
        rewrites=rewrites,
        seconds=seconds,
    )
    if check_inputs is not None:
        result.max_abs_diff = max_output_difference(source, target, check_inputs)
        if not result.max_abs_diff <= atol:
            raise ExportValidationError(
                f"fused graph differs from its source by {result.max_abs_diff:.3g} > atol "
                f"{atol:g}: export with fusion off and report the model to lrt-deploy"
            )
    logger.info("fused transformer: %d -> %d nodes, %s", result.nodes_before,
                result.nodes_after, result.fused)
    return result


@contextlib.contextmanager
def _packed_attention(allowed: bool) -> Iterator[None]:
    """Switch off onnxscript's MultiHeadAttention -> packed-QKV Attention step for the block.

    ``optimize_for_ort`` has no option for it; its step is the module-level ``fuse_attention``
    of ``onnxscript.rewriter.ort_fusions._core`` (onnxscript pinned in constraints.txt). If a
    later onnxscript moves it, the packing stays on and a warning says so."""
    if allowed:
        yield
        return
    from onnxscript.rewriter.ort_fusions import _core

    original = getattr(_core, "fuse_attention", None)
    if original is None:
        logger.warning("this onnxscript has no fuse_attention step: Q/K/V stay packed")
        yield
        return
    _core.fuse_attention = lambda *_args, **_kwargs: 0
    try:
        yield
    finally:
        _core.fuse_attention = original


def _attribute(node: Any, name: str) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


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
