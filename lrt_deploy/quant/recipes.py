"""Precision recipes: frozen, self-validating configs, each mapped to the graph passes that
apply it.

A recipe round-trips through a dict (the manifest records it); ``@register_precision`` maps its
type to ``passes(recipe) -> [GraphPass, ...]`` and :func:`apply_precision` runs that list, so a
new precision is one dataclass plus one registered function.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from lrt_deploy.errors import LrtDeployError
from lrt_deploy.graph.passes import GraphPass, PassContext, run_passes

__all__ = [
    "DynamicInt8",
    "Float16",
    "Int4WeightOnly",
    "Int8WeightOnly",
    "Precision",
    "PrecisionContext",
    "StaticInt8",
    "apply_precision",
    "precision_from_dict",
    "precision_passes",
    "register_precision",
]

logger = logging.getLogger(__name__)


def _check_bool(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise LrtDeployError(f"{what} must be True or False, got {value!r}")


@dataclass(frozen=True)
class Precision:
    """Base of the precision recipes. Subclasses set the class attributes below.

    Attributes:
        kind: Stable name written to the manifest (``precision_from_dict`` reads it back).
        suffix: Short name of the variant it builds (``fp16``, ``int8``, ``int4``).
        needs_calibration: True when the pass needs calibration inputs.
        packs_qkv: Whether the fp32 graph it starts from may pack dense Q/K/V into one
            ``Attention`` (whose weight only the int8 quantiser can still reach).
        uses_calibration: True when the pass does better with calibration inputs but runs
            without them.
    """

    kind: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    uses_calibration: ClassVar[bool] = False
    packs_qkv: ClassVar[bool] = True

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": ..., **fields}``, JSON-ready; :func:`precision_from_dict` inverts it."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def describe(self) -> str:
        """One line for progress output."""
        return self.kind


@dataclass(frozen=True)
class Float16(Precision):
    """fp16 weights and activations, LayerNorm/Softmax kept fp32 (``convert_float16``)."""

    kind: ClassVar[str] = "float16"
    suffix: ClassVar[str] = "fp16"

    def describe(self) -> str:
        return "fp16 (LayerNorm/Softmax kept fp32)"


@dataclass(frozen=True)
class DynamicInt8(Precision):
    """Dynamic int8: int8 weights, activations quantised at run time (``quantize_int8``).

    Attributes:
        per_channel: One weight scale per output channel (else one per tensor).
        exclude_sensitive: Keep this many MatMuls fp32: those whose int8 alone lowers the
            model output's cosine most on the calibration data (``rank_int8_damage``).
        smooth: Scale outlier input channels into the weights first
            (``smooth_outlier_channels``); recorded as skipped without calibration data.
        weight_grid: ``pair-safe`` (exact on every device class) or ``full-range``
            (saturates on x86 AVX2 / AVX-512 without VNNI), see :mod:`lrt_deploy.quant.rules`.
    """

    kind: ClassVar[str] = "dynamic-int8"
    suffix: ClassVar[str] = "int8"
    per_channel: bool = True
    exclude_sensitive: int = 0
    smooth: bool = True
    weight_grid: str = "pair-safe"

    def __post_init__(self) -> None:
        _check_bool(self.per_channel, "DynamicInt8.per_channel")
        _check_count(self.exclude_sensitive, "DynamicInt8.exclude_sensitive")
        _check_bool(self.smooth, "DynamicInt8.smooth")
        _check_grid(self.weight_grid, "DynamicInt8.weight_grid")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.exclude_sensitive > 0

    @property
    def uses_calibration(self) -> bool:  # type: ignore[override]
        return self.smooth

    def describe(self) -> str:
        smooth = ", outlier channels smoothed" if self.smooth else ""
        return f"int8 (per_channel={self.per_channel}, {self.weight_grid} weights{smooth})"


@dataclass(frozen=True)
class StaticInt8(Precision):
    """Static int8 in QDQ format, activation ranges calibrated (``quantize_static_int8``).

    Attributes:
        per_channel: One weight scale per output channel.
        exclude_sensitive: Keep this many MatMuls fp32: those whose static int8 alone lowers
            the model output's cosine most on the calibration data (``rank_int8_damage``).
        weight_grid: As for :class:`DynamicInt8`.
    """

    kind: ClassVar[str] = "static-int8"
    suffix: ClassVar[str] = "int8"
    needs_calibration: ClassVar[bool] = True
    per_channel: bool = True
    exclude_sensitive: int = 0
    weight_grid: str = "pair-safe"

    def __post_init__(self) -> None:
        _check_bool(self.per_channel, "StaticInt8.per_channel")
        _check_count(self.exclude_sensitive, "StaticInt8.exclude_sensitive")
        _check_grid(self.weight_grid, "StaticInt8.weight_grid")

    def describe(self) -> str:
        return f"static int8 QDQ (calibrated, {self.weight_grid} weights)"


@dataclass(frozen=True)
class Int8WeightOnly(Precision):
    """Int8 weights, activations float (``quantize_weights_int8``): no activation is rounded at
    run time, so every onnxruntime build gives the same outputs up to float rounding."""

    kind: ClassVar[str] = "int8-weight-only"
    suffix: ClassVar[str] = "int8"

    def describe(self) -> str:
        return "int8 weight-only (DequantizeLinear, activations float)"


@dataclass(frozen=True)
class Int4WeightOnly(Precision):
    """4-bit weight-only ``MatMulNBits`` blocks along the input dimension
    (``quantize_weights_4bit``); Q/K/V stay three MatMuls (``packs_qkv`` False) so they are 4-bit.

    Attributes:
        block: Weights per scale; a power of two >= 16 (ONNX Runtime's kernel requires it).
        embeddings: Embedding tables to 4-bit blocks along the hidden dimension too
            (``GatherBlockQuantized``).
    """

    kind: ClassVar[str] = "int4-weight-only"
    suffix: ClassVar[str] = "int4"
    packs_qkv: ClassVar[bool] = False
    block: int = 32
    embeddings: bool = True

    def __post_init__(self) -> None:
        block = self.block
        if (isinstance(block, bool) or not isinstance(block, int) or block < 16
                or block & (block - 1)):
            raise LrtDeployError(
                f"Int4WeightOnly.block must be a power of two >= 16, got {block!r}: e.g. 32"
            )
        _check_bool(self.embeddings, "Int4WeightOnly.embeddings")

    def describe(self) -> str:
        tables = " and embedding tables (GatherBlockQuantized)" if self.embeddings else ""
        return f"4-bit weights (MatMulNBits{tables}, block {self.block})"


@dataclass(frozen=True)
class PrecisionContext:
    """What a precision's passes may use besides their input graph: calibration batches, the
    model's label for progress lines, and the progress callback."""

    calibration: Sequence[Mapping[str, np.ndarray]] = ()
    label: str = "model"
    progress: Callable[[str], None] = lambda _line: None


_P = TypeVar("_P", bound=Precision)
PassList = Callable[[Any], list[GraphPass]]
_PASSES: dict[type[Precision], PassList] = {}
_KINDS: dict[str, type[Precision]] = {}


def register_precision(
    config_type: type[_P],
) -> Callable[[Callable[[_P], list[GraphPass]]], PassList]:
    """Register ``passes(recipe) -> [GraphPass, ...]``, the passes that apply ``config_type``."""

    def decorate(passes: PassList) -> PassList:
        _PASSES[config_type] = passes
        _KINDS[config_type.kind] = config_type
        return passes

    return decorate


def precision_passes(precision: Precision) -> list[GraphPass]:
    """The graph passes that apply ``precision``, in order."""
    passes = _PASSES.get(type(precision))
    if passes is None:
        raise LrtDeployError(
            f"no precision pass is registered for {type(precision).__name__}: register one "
            "with lrt_deploy.quant.recipes.register_precision"
        )
    return passes(precision)


def apply_precision(
    precision: Precision, source: Path, target: Path, context: PrecisionContext
) -> dict[str, Any]:
    """Run ``precision``'s passes from ``source`` to ``target``; returns the manifest record
    (the last pass's, with the records of the passes before it that have a ``record_as`` key)."""
    source, target = Path(source), Path(target)
    passes = precision_passes(precision)
    results = run_passes(passes, source, PassContext(
        output=target, label=context.label, calibration=context.calibration,
        progress=context.progress))
    record = results[-1].to_dict()
    for graph_pass, result in zip(passes[:-1], results[:-1], strict=True):
        key = getattr(graph_pass, "record_as", None)
        if key:
            record[key] = result.to_dict()
        if result.output not in (source, target):
            for path in (result.output, result.output.with_name(result.output.name + ".data")):
                path.unlink(missing_ok=True)
    return record


def _check_grid(grid: object, what: str) -> None:
    from lrt_deploy.quant.rules import INT8_WEIGHT_GRIDS

    if grid not in INT8_WEIGHT_GRIDS:
        raise LrtDeployError(
            f"{what} must be one of {', '.join(INT8_WEIGHT_GRIDS)}, got {grid!r}: pair-safe is "
            "exact on every CPU, full-range saturates on x86 AVX2 without VNNI"
        )


def _check_count(count: object, what: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise LrtDeployError(f"{what} is a count of MatMuls >= 0, got {count!r}: e.g. 6")


def precision_from_dict(data: Mapping[str, Any] | None) -> Precision | None:
    """Rebuild a recipe from :meth:`Precision.to_dict` output (``None`` stays ``None``)."""
    if data is None:
        return None
    fields = dict(data)
    kind = fields.pop("kind", None)
    config_type = _KINDS.get(kind)
    if config_type is None:
        raise LrtDeployError(
            f"unknown precision kind {kind!r}: choose one of {', '.join(sorted(_KINDS))}"
        )
    known = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise LrtDeployError(f"unknown {config_type.__name__} fields {unknown}")
    # Fields a manifest may lack, with the value such a manifest's bundle was built with.
    for field_name, value in _OMITTED_MEANS.get(config_type, {}).items():
        fields.setdefault(field_name, value)
    return config_type(**fields)


@register_precision(Float16)
def _float16(recipe: Float16) -> list[GraphPass]:
    from lrt_deploy.quant.passes.float16 import Float16Pass

    return [Float16Pass()]


@register_precision(DynamicInt8)
def _dynamic_int8(recipe: DynamicInt8) -> list[GraphPass]:
    from lrt_deploy.quant.passes.dynamic import DynamicInt8Pass
    from lrt_deploy.quant.passes.sensitivity import ExcludeSensitive
    from lrt_deploy.quant.passes.smoothing import SmoothingPass

    kept: list[str] = []
    return [
        *([SmoothingPass()] if recipe.smooth else []),
        *([ExcludeSensitive(recipe.exclude_sensitive, kept, recipe.per_channel,
                            recipe.weight_grid)] if recipe.exclude_sensitive else []),
        DynamicInt8Pass(recipe.per_channel, recipe.weight_grid, keep_float=kept),
    ]


@register_precision(StaticInt8)
def _static_int8(recipe: StaticInt8) -> list[GraphPass]:
    from lrt_deploy.quant.passes.sensitivity import ExcludeSensitive
    from lrt_deploy.quant.passes.static import StaticInt8Pass

    kept: list[str] = []
    return [
        *([ExcludeSensitive(recipe.exclude_sensitive, kept, recipe.per_channel,
                            recipe.weight_grid, activations="static")]
          if recipe.exclude_sensitive else []),
        StaticInt8Pass(recipe.per_channel, recipe.weight_grid, keep_float=kept),
    ]


@register_precision(Int8WeightOnly)
def _int8_weight_only(recipe: Int8WeightOnly) -> list[GraphPass]:
    from lrt_deploy.quant.passes.weight_only import Int8WeightOnlyPass

    return [Int8WeightOnlyPass()]


@register_precision(Int4WeightOnly)
def _int4_weight_only(recipe: Int4WeightOnly) -> list[GraphPass]:
    from lrt_deploy.quant.passes.weight_only import Int4WeightOnlyPass

    return [Int4WeightOnlyPass(recipe.block, recipe.embeddings)]


_OMITTED_MEANS: dict[type[Precision], dict[str, Any]] = {
    Int4WeightOnly: {"embeddings": False},
    DynamicInt8: {"smooth": False, "weight_grid": "full-range"},
    StaticInt8: {"weight_grid": "full-range"},
}
