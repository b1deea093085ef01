"""Transformer fusions for dense and low-rank graphs: onnxscript's rewriter, the padding-mask
pass, then ONNX Runtime's portable optimisation, checked against the unfused graph.

Order matters: ``optimize_for_ort`` fuses SDPA into (packed-QKV) ``Attention`` or
``MultiHeadAttention``, erf GELU into ``BiasGelu`` and residual Add + LayerNorm into
``SkipLayerNormalization``; :mod:`.attention_mask` then feeds attention the padding mask itself
(which lets ORT's dynamic quantiser make ``QAttention``); ORT's ``extended`` level last folds the
packed Q/K/V ``Concat`` into one initializer and adds its remaining fusions.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.errors import ExportValidationError
from lrt_deploy.export.passes.attention_mask import attention_mask_to_index
from lrt_deploy.export.passes.optimize import optimize_graph
from lrt_deploy.graph.external_data import EXTERNAL_DATA_THRESHOLD, save_model_proto
from lrt_deploy.graph.ops import count_changes, op_counts
from lrt_deploy.graph.passes import PassContext, PassResult

__all__ = ["FUSED_OP_TYPES", "TransformerFusion", "fuse_transformer", "max_output_difference"]

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


@dataclass(frozen=True)
class TransformerFusion:
    """Pass: fuse attention, GELU, bias and residual LayerNorm of an exported transformer.

    Attributes:
        num_heads: Attention heads per layer; fused attention with another count is an error.
        hidden_size: Model width, a multiple of ``num_heads``.
        level: ORT optimisation applied last: ``basic`` or ``extended``.
        pack_qkv: Let dense Q/K/V become one packed-QKV ``Attention`` (fp32, int8). False stops
            at ``MultiHeadAttention``: 4-bit kernels cannot read ``Attention``'s packed weight.
        atol: Largest allowed output difference from the unfused graph on the check inputs.
        external_data_threshold: Weight bytes above which the intermediate graph keeps its
            weights in a side file.
    """

    num_heads: int
    hidden_size: int
    level: str = "extended"
    pack_qkv: bool = True
    atol: float = 1e-4
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    name = "fusion"

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads "
                             f"{self.num_heads}")

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Fuse ``model`` into ``context.output``, checked on ``context.check_inputs`` if any.

        ``details``: ``nodes_before``/``nodes_after``, ``attention_layers``, ``gelus``,
        ``fused`` (count per :data:`FUSED_OP_TYPES` op), ``op_changes``, ``level``,
        ``max_abs_diff`` (None without check inputs) and ``rewrites`` (per rule set).

        Raises:
            ExportValidationError: The fused graph differs by more than ``atol``, or its
                attention has another head count than ``num_heads``.
        """
        context.progress(
            f"fusing {context.label} attention/GELU/LayerNorm, then ORT {self.level}")
        source, target = Path(model), context.output
        started = time.perf_counter()
        proto, rewrites = self._rewrite(source)
        seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory(prefix="lrt-fusion-") as folder:
            staged = Path(folder) / "fused.onnx"
            save_model_proto(proto, staged, threshold=self.external_data_threshold)
            del proto
            optimize_graph(staged, target, self.level)
        details = self._record(source, target, rewrites)
        if context.check_inputs:
            details["max_abs_diff"] = diff = max_output_difference(
                source, target, context.check_inputs)
            if not diff <= self.atol:
                raise ExportValidationError(
                    f"fused graph differs from its source by {diff:.3g} > atol {self.atol:g}: "
                    "export with fusion off and report the model to lrt-deploy"
                )
        logger.info("fused transformer: %d -> %d nodes, %s", details["nodes_before"],
                    details["nodes_after"], details["fused"])
        return PassResult(self.name, target, details, seconds=seconds)

    def _rewrite(self, source: Path) -> tuple[Any, dict[str, int]]:
        """The graph after onnxscript's fusions and the mask pass, and what each rule did."""
        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        from lrt_deploy._logs import quiet_loggers

        model = ir.load(str(source))
        try:
            with quiet_loggers("onnxscript"), _packed_attention(self.pack_qkv):
                model, counts = optimize_for_ort(model)
        except Exception as exc:  # noqa: BLE001 - a graph the rewriter cannot take still deploys
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            logger.warning("onnxscript's transformer fusion failed (%s): graph left unfused",
                           first)
            model, counts = ir.load(str(source)), {"failed": 1}
        proto = ir.serde.serialize_model(model)
        del model
        rewrites = {name: count for name, count in counts.items() if count}
        rewrites["attention_mask_to_index"] = attention_mask_to_index(proto)
        heads = {
            _attribute(node, "num_heads") for node in proto.graph.node
            if node.op_type in ("Attention", "MultiHeadAttention")
        }
        if heads - {self.num_heads}:
            raise ExportValidationError(
                f"fused attention has {sorted(heads)} heads, the model config says "
                f"{self.num_heads}: check the config's num_attention_heads, or export with "
                "fusion off"
            )
        return proto, rewrites

    def _record(self, source: Path, target: Path, rewrites: dict[str, int]) -> dict[str, Any]:
        before, after = op_counts(source), op_counts(target)
        return {
            "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()),
            "attention_layers": after["Attention"] + after["MultiHeadAttention"],
            "gelus": after["BiasGelu"] + after["Gelu"],
            "fused": {op: after[op] for op in FUSED_OP_TYPES if after.get(op)},
            "op_changes": count_changes(before, after),
            "level": self.level,
            "max_abs_diff": None,
            "rewrites": rewrites,
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
) -> PassResult:
    """Run :class:`TransformerFusion` from ``source`` to ``target`` (fields as its own)."""
    fusion = TransformerFusion(
        num_heads=num_heads, hidden_size=hidden_size, level=level, pack_qkv=pack_qkv,
        atol=atol, external_data_threshold=external_data_threshold,
    )
    context = PassContext(output=Path(target), check_inputs=dict(check_inputs or {}))
    return fusion.run(Path(source), context)


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
