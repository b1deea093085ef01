"""Build the variants of one model for a target: export -> validate -> optimise -> precision.

Every model of a run (the dense baseline and the low-rank one) goes through exactly the same
steps, so their measured differences come from the compression alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lrt_deploy.export.targets import Target
from lrt_deploy.quant.recipes import PrecisionContext, apply_precision

if TYPE_CHECKING:
    from lrt_deploy.export.dense_equivalent import ByDesignBaseline, FoldResult
    from lrt_deploy.load import LoadedModel

__all__ = [
    "ModelKind", "Variant", "build_by_design_variants", "build_variants", "count_params",
    "raw_path",
]

logger = logging.getLogger(__name__)


class ModelKind(Enum):
    """Which model of a run a variant was built from; ``key`` names files, ``label`` displays."""

    DENSE = ("dense", "dense")
    LRT = ("lrt", "LRT")
    LINFORMER = ("lrt", "Linformer")
    HEALED = ("healed", "healed")

    @property
    def key(self) -> str:
        return self.value[0]

    @property
    def label(self) -> str:
        return self.value[1]

    @property
    def low_rank(self) -> bool:
        return self in (ModelKind.LRT, ModelKind.LINFORMER)


@dataclass
class Variant:
    """One built graph and what was measured on it.

    Attributes:
        key: File-name stem, e.g. ``dense-fp32``, ``lrt-int8``.
        label: Display name, e.g. ``LRT int8`` (rendered from ``model`` and ``precision``).
        onnx_path: The graph (in the run's work folder).
        model: The model it was built from.
        precision: ``fp32`` or the precision recipe's suffix (``int8``, ``fp16``, ``int4``).
        is_baseline: The variant every other is compared with.
        deployed: The variant written to the bundle.
        validation: Per validation batch, the check against PyTorch.
        optimization: What graph optimisation/fusion did.
        quantization: What the precision pass did (``None`` for fp32).
        fidelity: Metric -> value against the reference PyTorch outputs (after measuring).
        latency: ``LatencyStats.to_dict()`` (after measuring).
        file_bytes: Size of the graph and its external data.
        params: Parameter count of the source module, when known.
        provider: ``Session.provider_report()`` of the measuring session.
    """

    key: str
    label: str
    onnx_path: Path
    model: ModelKind = ModelKind.DENSE
    precision: str = "fp32"
    is_baseline: bool = False
    deployed: bool = False
    validation: list[dict[str, Any]] = field(default_factory=list)
    optimization: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    fidelity: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    file_bytes: int = 0
    params: int | None = None
    provider: dict[str, Any] = field(default_factory=dict)


def count_params(module: Any) -> int | None:
    """Parameter count of an ``nn.Module``; ``None`` for graphs (TorchScript, .pt2)."""
    import torch

    if isinstance(module, torch.nn.Module):
        return sum(p.numel() for p in module.parameters())
    return None


def build_variants(
    kind: ModelKind,
    model: LoadedModel,
    *,
    target: Target,
    work: Path,
    is_baseline: bool,
    validation_batches: Sequence[dict[str, Any]],
    check_feeds: Mapping[str, np.ndarray],
    calibration_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    progress: Callable[[str], None] = lambda _line: None,
    raw: Path | None = None,
) -> list[Variant]:
    """Export one model and derive its deployable variants: fp32 (optimised), then the
    target's precision recipe when it has one.

    Args:
        kind: Which model of the run this is (names its files and variants).
        model: The model to export.
        target: Opset, optimisation level, fusion, fixed shape and precision to build.
        work: Folder for the intermediate graphs.
        is_baseline: Mark the fp32 variant as the run's baseline.
        validation_batches: Inputs the exported graph is checked against PyTorch on.
        check_feeds: Inputs the fused graph is checked against the unfused one on.
        calibration_feeds: Named input arrays for precision recipes that calibrate.
        progress: Called with a short line as each step starts.
        raw: Start from this ONNX graph instead of exporting ``model`` (a graph derived from
            its export, e.g. the dense equivalent); it is still validated against ``model``.

    Returns:
        The fp32 variant, then the precision variant when the target has one.
    """
    from lrt_deploy.export.onnx_export import export_onnx
    from lrt_deploy.export.reproducibility import normalize_for_reproducibility
    from lrt_deploy.export.validate import validate_onnx

    key, label = kind.key, kind.label
    if raw is None:
        progress(f"exporting {label} to ONNX (opset {target.opset})")
        raw = export_onnx(model, raw_path(work, key), opset=target.opset)
        # Drops exporter stack traces (absolute paths of this machine) so builds are
        # reproducible.
        normalize_for_reproducibility(raw)
    progress(f"validating {label} ONNX against PyTorch")
    checks = [c.to_dict() for c in validate_onnx(raw, model.forward, list(validation_batches))]
    fp32 = work / f"{key}.fp32.onnx"
    if target.fusion and model.attention_shape is not None:
        from lrt_deploy.export.fusion import fuse_transformer

        heads, hidden = model.attention_shape
        progress(f"fusing {label} attention/GELU/LayerNorm, then ORT {target.optimization_level}")
        optimization = fuse_transformer(
            raw, fp32, num_heads=heads, hidden_size=hidden, level=target.optimization_level,
            check_inputs=dict(check_feeds),
            pack_qkv=target.precision is None or target.precision.packs_qkv,
        ).to_dict()
    else:
        from lrt_deploy.export.optimize import optimize_graph

        progress(f"optimising {label} graph ({target.optimization_level})")
        optimization = optimize_graph(raw, fp32, target.optimization_level).to_dict()
    fp32 = _maybe_fix_shapes(fp32, target.fixed_shape)
    params = count_params(model.module)
    variants = [Variant(
        key=f"{key}-fp32", label=f"{label} fp32", onnx_path=fp32, model=kind,
        is_baseline=is_baseline,
        validation=checks, optimization=optimization, params=params,
    )]
    precision = target.precision
    if precision is not None:
        suffix = precision.suffix
        path = work / f"{key}.{suffix}.onnx"
        context = PrecisionContext(
            calibration=list(calibration_feeds), label=label, progress=progress
        )
        details = apply_precision(precision, fp32, path, context)
        variants.append(Variant(
            key=f"{key}-{suffix}", label=f"{label} {suffix}", onnx_path=path, model=kind,
            precision=suffix, optimization=_fused_after_precision(optimization, path),
            quantization=details, params=params,
        ))
    return variants


def _fused_after_precision(optimization: dict[str, Any], path: Path) -> dict[str, Any]:
    """The fp32 graph's optimisation record with the fused-op counts of the quantised graph
    (int8 turns packed ``Attention`` into ``QAttention``: the fp32 counts would misreport it)."""
    if "fused" not in optimization:
        return optimization
    from lrt_deploy.export.fusion import FUSED_OP_TYPES
    from lrt_deploy.graph.ops import op_counts

    after = op_counts(path)
    fused = {op: after[op] for op in (*FUSED_OP_TYPES, "QAttention") if after.get(op)}
    return {**optimization, "fused": fused}


def raw_path(work: Path, key: str) -> Path:
    """Where :func:`build_variants` writes the exporter's graph of ``key``."""
    return work / f"{key}.raw.onnx"


def build_by_design_variants(
    model: LoadedModel,
    baseline: ByDesignBaseline,
    *,
    target: Target,
    work: Path,
    validation_batches: Callable[[LoadedModel], Sequence[dict[str, Any]]],
    check_feeds: Mapping[str, np.ndarray],
    calibration_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    progress: Callable[[str], None] = lambda _line: None,
) -> tuple[list[Variant], FoldResult | None]:
    """The variants of a model built low-rank (or Linformer) by design and of its baseline.

    The baseline (``baseline.loaded``, or for TorchScript/``.pt2`` models the model's own
    raw ONNX with every low-rank pair multiplied out) goes through the same optimise and
    precision steps as the model. The folded graph is validated against the by-design
    model's PyTorch outputs, which checks the fold.

    Args:
        model: The by-design model (deployed).
        baseline: From :func:`lrt_deploy.export.dense_equivalent.by_design_baseline`.
        target: As for :func:`build_variants`.
        work: As for :func:`build_variants`.
        validation_batches: Validation inputs of a model (``data.readers.validation_batches``
            with the run's held-out batches bound).
        check_feeds: As for :func:`build_variants`.
        calibration_feeds: As for :func:`build_variants`.
        progress: As for :func:`build_variants`.

    Returns:
        The dense variants (baseline first) then the model's (deployed last), and the fold
        when the baseline was made on the graph. A graph with no foldable pair gives only
        the model's variants, its fp32 one the baseline.
    """
    from lrt_deploy.export.dense_equivalent import dense_equivalent_onnx

    kind = ModelKind.LINFORMER if baseline.kind == "standard-attention" else ModelKind.LRT
    common: dict[str, Any] = {
        "target": target, "work": work, "check_feeds": check_feeds,
        "calibration_feeds": calibration_feeds, "progress": progress,
    }
    if baseline.loaded is not None:
        dense = build_variants(
            ModelKind.DENSE, baseline.loaded, is_baseline=True,
            validation_batches=validation_batches(baseline.loaded), **common,
        )
        lowrank = build_variants(
            kind, model, is_baseline=False,
            validation_batches=validation_batches(model), **common,
        )
        return dense + lowrank, None
    # Graph path: the module classes are gone, so the LRT export is folded instead.
    checks = validation_batches(model)
    lowrank = build_variants(
        kind, model, is_baseline=False, validation_batches=checks, **common
    )
    progress("multiplying out the low-rank pairs of the exported graph (dense equivalent)")
    fold = dense_equivalent_onnx(raw_path(work, "lrt"), raw_path(work, "dense"))
    if not fold.pairs:
        logger.warning("no low-rank MatMul pair found in the exported graph: the model is "
                       "its own baseline")
        lowrank[0].is_baseline = True
        return lowrank, fold
    dense = build_variants(
        ModelKind.DENSE, model, is_baseline=True, validation_batches=checks,
        raw=raw_path(work, "dense"), **common,
    )
    for variant in dense:
        if variant.params is not None:
            variant.params += fold.params_after - fold.params_before
    return dense + lowrank, fold


def _maybe_fix_shapes(path: Path, fixed_shape: Mapping[str, int]) -> Path:
    if not fixed_shape:
        return path
    from lrt_deploy.export.mobile import fix_input_shapes

    fixed = path.with_name(path.name.replace(".onnx", ".fixed.onnx"))
    fix_input_shapes(path, fixed, dict(fixed_shape))
    return fixed
