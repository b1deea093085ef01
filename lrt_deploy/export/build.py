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
    from lrt_deploy.export.by_design import ByDesignBaseline
    from lrt_deploy.export.passes.dense_equivalent import FoldResult
    from lrt_deploy.graph.passes import GraphPass, PassContext
    from lrt_deploy.load import LoadedModel

__all__ = [
    "ModelKind", "PrecisionRecord", "ProviderReport", "Variant", "build_by_design_variants",
    "build_variants", "count_params", "export_passes", "raw_path",
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


@dataclass(frozen=True)
class PrecisionRecord:
    """What a precision pass did: its record as the manifest stores it, read through names."""

    details: Mapping[str, Any]

    @property
    def mode(self) -> str | None:
        """``dynamic``, ``static``, ``weight-only`` ... as the pass named it, or None."""
        return self.details.get("mode")

    @property
    def excluded_nodes(self) -> tuple[str, ...]:
        """The MatMuls the pass left in float."""
        return tuple(self.details.get("excluded_nodes") or ())

    @property
    def smoothing(self) -> Mapping[str, Any] | None:
        """What outlier smoothing did before quantising, or None when it did not run."""
        return self.details.get("smoothing")

    def to_dict(self) -> dict[str, Any]:
        """The pass's record, keys in the order it wrote them."""
        return dict(self.details)


@dataclass(frozen=True)
class ProviderReport:
    """Which execution providers a measuring session asked for and ran on."""

    requested: tuple[str, ...] = ()
    available: tuple[str, ...] = ()
    active: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    fell_back: bool = False
    message: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProviderReport:
        """From ``Session.provider_report()``."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value
                      for key, value in data.items() if key in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        """As ``Session.provider_report()`` returns it (lists of names)."""
        return {"requested": list(self.requested), "available": list(self.available),
                "active": list(self.active), "missing": list(self.missing),
                "fell_back": self.fell_back, "message": self.message}


@dataclass
class Variant:
    """One built graph and what was measured on it; ``key`` and ``label`` are rendered from
    ``model`` and ``precision``.

    Attributes:
        onnx_path: The graph (in the run's work folder).
        model: The model it was built from.
        precision: ``fp32`` or the precision recipe's suffix (``int8``, ``fp16``, ``int4``).
        is_baseline: The variant every other is compared with.
        deployed: The variant written to the bundle.
        validation: Per validation batch, the check against PyTorch.
        optimization: What graph optimisation/fusion did.
        quantization: What the precision pass did (``None`` for fp32).
        fidelity: Metric -> value against the reference PyTorch outputs (after measuring).
        latency: The latency statistics' ``to_dict()`` (after measuring).
        file_bytes: Size of the graph and its external data.
        params: Parameter count of the source module, when known.
        provider: The providers of the measuring session.
    """

    onnx_path: Path
    model: ModelKind
    precision: str = "fp32"
    is_baseline: bool = False
    deployed: bool = False
    validation: list[dict[str, Any]] = field(default_factory=list)
    optimization: dict[str, Any] | None = None
    quantization: PrecisionRecord | None = None
    fidelity: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    file_bytes: int = 0
    params: int | None = None
    provider: ProviderReport = field(default_factory=ProviderReport)

    @property
    def key(self) -> str:
        """File-name stem, e.g. ``dense-fp32``, ``lrt-int8``."""
        return f"{self.model.key}-{self.precision}"

    @property
    def label(self) -> str:
        """Display name, e.g. ``LRT int8``."""
        return f"{self.model.label} {self.precision}"


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
    """Export ``model`` (or start from ``raw``, a graph derived from its export), validate it
    against PyTorch, run :func:`export_passes` for the fp32 variant, then the target's precision.

    ``check_feeds`` check the fused graph against the unfused one, ``calibration_feeds`` feed
    precision recipes that calibrate; returns the fp32 variant, then the precision one if any.
    """
    from lrt_deploy.export.validate import validate_onnx
    from lrt_deploy.graph.passes import PassContext, run_passes

    key, label = kind.key, kind.label
    context = PassContext(
        output=raw_path(work, key), label=label, check_inputs=dict(check_feeds),
        calibration=list(calibration_feeds), progress=progress,
    )
    if raw is None:
        raw = _export(model, target, context)
    progress(f"validating {label} ONNX against PyTorch")
    checks = [c.to_dict() for c in validate_onnx(raw, model.forward, list(validation_batches))]
    results = run_passes(
        export_passes(target, model), raw, context.writing(work / f"{key}.fp32.onnx"))
    fp32, optimization = results[-1].output, results[0].details
    params = count_params(model.module)
    variants = [Variant(
        onnx_path=fp32, model=kind, is_baseline=is_baseline,
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
            onnx_path=path, model=kind, precision=suffix,
            optimization=_fused_after_precision(optimization, path),
            quantization=PrecisionRecord(details), params=params,
        ))
    return variants


def export_passes(target: Target, model: LoadedModel) -> list[GraphPass]:
    """The passes from a validated export to the fp32 variant, in order; the first optimises
    (its record is the variant's ``optimization``)."""
    from lrt_deploy.export.passes.fixed_shape import FixedShape
    from lrt_deploy.export.passes.fusion import TransformerFusion
    from lrt_deploy.export.passes.optimize import OrtOptimization

    passes: list[GraphPass] = []
    if target.fusion and model.attention_shape is not None:
        heads, hidden = model.attention_shape
        passes.append(TransformerFusion(
            num_heads=heads, hidden_size=hidden, level=target.optimization_level,
            pack_qkv=target.precision is None or target.precision.packs_qkv,
        ))
    else:
        passes.append(OrtOptimization(level=target.optimization_level))
    if target.fixed_shape:
        passes.append(FixedShape(sizes=dict(target.fixed_shape)))
    return passes


def _export(model: LoadedModel, target: Target, context: PassContext) -> Path:
    """Export ``model`` to ``context.output``, normalised so builds are reproducible."""
    from lrt_deploy.export.onnx_export import export_onnx
    from lrt_deploy.export.passes.reproducibility import NormalizeForReproducibility
    from lrt_deploy.graph.passes import run_passes

    context.progress(f"exporting {context.label} to ONNX (opset {target.opset})")
    raw = export_onnx(model, context.output, opset=target.opset)
    return run_passes([NormalizeForReproducibility()], raw, context)[-1].output


def _fused_after_precision(optimization: dict[str, Any], path: Path) -> dict[str, Any]:
    """The fp32 graph's optimisation record with the fused-op counts of the quantised graph
    (int8 turns packed ``Attention`` into ``QAttention``: the fp32 counts would misreport it)."""
    if "fused" not in optimization:
        return optimization
    from lrt_deploy.export.passes.fusion import FUSED_OP_TYPES
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
    """The dense variants (baseline first) then the by-design model's (deployed last), and the
    fold when the baseline is the model's raw ONNX with its low-rank pairs multiplied out.

    ``baseline`` comes from :func:`lrt_deploy.export.by_design.by_design_baseline`; the folded
    graph is validated against the model's PyTorch outputs, which checks the fold. A graph with
    no foldable pair gives only the model's variants, its fp32 one the baseline.
    """
    from lrt_deploy.export.passes.dense_equivalent import DenseEquivalentFold, FoldResult
    from lrt_deploy.graph.passes import PassContext, run_passes

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
    context = PassContext(output=raw_path(work, "dense"), progress=progress)
    folding = run_passes([DenseEquivalentFold()], raw_path(work, "lrt"), context)
    fold = FoldResult(**folding[-1].details)
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

