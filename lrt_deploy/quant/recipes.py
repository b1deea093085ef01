"""Precision recipes: typed configs, each owning its validation and the pass that applies it.

In the style of torchao's config-type -> handler registry: a recipe is a frozen dataclass
(:class:`Float16`, :class:`DynamicInt8`, :class:`StaticInt8`, :class:`Int8WeightOnly`,
:class:`Int4WeightOnly`) that
checks its own fields, round-trips through a dict (the manifest records it), and has one
handler registered for its type. :func:`apply_precision` looks the handler up, so the build
applies whichever recipe a target holds without a chain of conditions, and a new precision is
one dataclass plus one ``@register_precision`` function.
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
            without them (a non-text model given no ``.npz``).
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
        per_channel: One scale per output channel (keeps MiniLM at ~0.99 cosine, where one
            scale per tensor drops it to ~0.96).
        exclude_sensitive: Keep this many MatMuls fp32: those whose int8 alone lowers the
            model output's cosine most on the calibration data (``rank_int8_damage``).
        smooth: Scale outlier input channels into the weights first
            (``smooth_outlier_channels``: one ``Mul`` per such input), measured on the
            calibration data; skipped, and said so, when a model has none.
        weight_grid: ``pair-safe`` (exact on every device class) or ``full-range``
            ([-127, 127]; wrong on x86 AVX2 / AVX-512 without VNNI), see
            :mod:`lrt_deploy.quant.rules`.
    """

    kind: ClassVar[str] = "dynamic-int8"
    suffix: ClassVar[str] = "int8"
    per_channel: bool = True
    exclude_sensitive: int = 0
    smooth: bool = True
    weight_grid: str = "pair-safe"

    def __post_init__(self) -> None:
        _check_bool(self.per_channel, "DynamicInt8.per_channel")
        _check_count(self.exclude_sensitive)
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
        exclude_sensitive: Keep this many MatMuls, those int8 hurts most on the calibration
            data (``find_sensitive_nodes``), in fp32.
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
        _check_count(self.exclude_sensitive)
        _check_grid(self.weight_grid, "StaticInt8.weight_grid")

    def describe(self) -> str:
        return f"static int8 QDQ (calibrated, {self.weight_grid} weights)"


@dataclass(frozen=True)
class Int8WeightOnly(Precision):
    """Int8 weights dequantised by ``DequantizeLinear``, activations float
    (``quantize_weights_int8``): as small as dynamic int8, and the same embeddings in every
    ONNX Runtime build (WebAssembly included), since no activation is rounded at run time.
    """

    kind: ClassVar[str] = "int8-weight-only"
    suffix: ClassVar[str] = "int8"

    def describe(self) -> str:
        return "int8 weight-only (DequantizeLinear, activations float)"


@dataclass(frozen=True)
class Int4WeightOnly(Precision):
    """4-bit weight-only ``MatMulNBits`` in blocks along the input dimension
    (``quantize_weights_4bit``); activations stay float, no calibration needed. Its fp32 graph
    keeps Q/K/V as three MatMuls (``packs_qkv`` False) so they are 4-bit too.

    Attributes:
        block: Weights per scale; a power of two >= 16 (ONNX Runtime's kernel requires it).
        embeddings: Embedding tables to 4-bit blocks along the hidden dimension too
            (``GatherBlockQuantized``): half of a small encoder's weights are its tables.
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
                f"Int4WeightOnly block must be a power of two >= 16, got {block!r}: e.g. 32"
            )
        _check_bool(self.embeddings, "Int4WeightOnly embeddings")

    def describe(self) -> str:
        tables = " and embedding tables (GatherBlockQuantized)" if self.embeddings else ""
        return f"4-bit weights (MatMulNBits{tables}, block {self.block})"


@dataclass(frozen=True)
class PrecisionContext:
    """Plain values a precision pass may need besides its source and destination.

    Attributes:
        calibration: Named input arrays per batch (recipes with ``needs_calibration``).
        label: Which model this is (``dense``, ``LRT``), for progress lines.
        progress: Called with a short line as the pass starts and at notable steps.
    """

    calibration: Sequence[Mapping[str, np.ndarray]] = ()
    label: str = "model"
    progress: Callable[[str], None] = lambda _line: None


_P = TypeVar("_P", bound=Precision)
Handler = Callable[[Any, Path, Path, PrecisionContext], dict[str, Any]]
_HANDLERS: dict[type[Precision], Handler] = {}
_KINDS: dict[str, type[Precision]] = {}


def register_precision(
    config_type: type[_P],
) -> Callable[[Callable[[_P, Path, Path, PrecisionContext], dict[str, Any]]], Handler]:
    """Register the pass for ``config_type``: ``handler(recipe, source, target, context)``
    writes ``target`` from the fp32 graph ``source`` and returns what it did (a dict)."""

    def decorate(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        _KINDS[config_type.kind] = config_type
        return handler

    return decorate


def apply_precision(
    precision: Precision, source: Path, target: Path, context: PrecisionContext
) -> dict[str, Any]:
    """Apply ``precision``'s registered pass to ``source``, writing ``target``.

    Raises:
        LrtDeployError: No pass is registered for the recipe's type.
    """
    handler = _HANDLERS.get(type(precision))
    if handler is None:
        raise LrtDeployError(
            f"no precision pass is registered for {type(precision).__name__}: register one "
            "with lrt_deploy.quant.recipes.register_precision"
        )
    return handler(precision, Path(source), Path(target), context)


def _check_grid(grid: object, what: str) -> None:
    from lrt_deploy.quant.rules import INT8_WEIGHT_GRIDS

    if grid not in INT8_WEIGHT_GRIDS:
        raise LrtDeployError(
            f"{what} must be one of {', '.join(INT8_WEIGHT_GRIDS)}, got {grid!r}: pair-safe is "
            "exact on every CPU, full-range saturates on x86 AVX2 without VNNI"
        )


def _check_count(count: object) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise LrtDeployError(
            f"exclude_sensitive is a count of MatMuls >= 0, got {count!r}: e.g. "
            "exclude_sensitive=6"
        )


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
    if config_type is Int4WeightOnly:
        # Written before the tables were quantised too: those int4 bundles kept them float.
        fields.setdefault("embeddings", False)
    if config_type is DynamicInt8:
        # Written before outlier smoothing: those int8 bundles were quantised plainly.
        fields.setdefault("smooth", False)
    if config_type in (DynamicInt8, StaticInt8):
        # Written before the pair-safe grid: those weights span [-127, 127].
        fields.setdefault("weight_grid", "full-range")
    return config_type(**fields)


@register_precision(Float16)
def _float16(recipe: Float16, source: Path, target: Path, context: PrecisionContext) -> dict:
    from lrt_deploy.quant.passes.float16 import convert_float16

    context.progress(f"converting {context.label} to fp16 (LayerNorm/Softmax kept fp32)")
    return convert_float16(source, target).to_dict()


@register_precision(DynamicInt8)
def _dynamic_int8(
    recipe: DynamicInt8, source: Path, target: Path, context: PrecisionContext
) -> dict:
    import tempfile

    from lrt_deploy.quant.passes.quantize import quantize_int8
    from lrt_deploy.quant.passes.sensitivity import rank_int8_damage
    from lrt_deploy.quant.passes.smoothing import SmoothingResult, smooth_outlier_channels

    with tempfile.TemporaryDirectory(prefix="lrt-int8-", dir=target.parent) as scratch:
        smoothing = None
        if recipe.smooth and context.calibration:
            context.progress(f"measuring {context.label}'s MatMul input channels for outliers")
            smoothed = Path(scratch) / "smoothed.onnx"
            smoothing = smooth_outlier_channels(source, smoothed, context.calibration)
            source = smoothed
            context.progress(
                f"smoothed {smoothing.channels} outlier channels on {smoothing.inputs} inputs "
                f"({len(smoothing.nodes)} MatMuls)")
        elif recipe.smooth:
            smoothing = SmoothingResult(skipped="no calibration data: a non-text model needs "
                                                "--calibration inputs.npz")
            context.progress(f"outlier smoothing skipped: {smoothing.skipped}")
        excluded: list[str] = []
        if recipe.exclude_sensitive:
            context.progress(
                f"measuring what int8 of each MatMul alone does to {context.label}'s output")
            ranked = rank_int8_damage(source, context.calibration,
                                      per_channel=recipe.per_channel,
                                      weight_grid=recipe.weight_grid, progress=context.progress)
            excluded = [entry.node for entry in ranked[: recipe.exclude_sensitive]]
            context.progress(
                f"keeping the {len(excluded)} MatMuls int8 hurts most fp32 (alone, mean cosine "
                + ", ".join(f"{entry.mean_cosine:.4f}" for entry in ranked[: len(excluded)])
                + ")"
            )
        context.progress(
            f"quantising {context.label} to int8 (per_channel={recipe.per_channel})")
        details = quantize_int8(source, target, per_channel=recipe.per_channel,
                                nodes_to_exclude=excluded,
                                weight_grid=recipe.weight_grid).to_dict()
    if smoothing is not None:
        details["smoothing"] = smoothing.to_dict()
    return details


@register_precision(StaticInt8)
def _static_int8(
    recipe: StaticInt8, source: Path, target: Path, context: PrecisionContext
) -> dict:
    from lrt_deploy.quant.passes.quantize import find_sensitive_nodes, quantize_static_int8

    context.progress(f"quantising {context.label} to static int8 QDQ (calibrated)")
    calibration = list(context.calibration)
    excluded: list[str] = []
    if recipe.exclude_sensitive:
        ranked = find_sensitive_nodes(source, calibration)
        excluded = [entry.node for entry in ranked[: recipe.exclude_sensitive]]
        context.progress(
            f"keeping the {len(excluded)} most int8-sensitive MatMuls of {context.label} fp32"
        )
    return quantize_static_int8(
        source, target, calibration, per_channel=recipe.per_channel, nodes_to_exclude=excluded,
        weight_grid=recipe.weight_grid,
    ).to_dict()


@register_precision(Int8WeightOnly)
def _int8_weight_only(
    recipe: Int8WeightOnly, source: Path, target: Path, context: PrecisionContext
) -> dict:
    from lrt_deploy.quant.passes.quantize import quantize_weights_int8

    context.progress(f"quantising {context.label} weights to int8 (weight-only)")
    return quantize_weights_int8(source, target).to_dict()


@register_precision(Int4WeightOnly)
def _int4_weight_only(
    recipe: Int4WeightOnly, source: Path, target: Path, context: PrecisionContext
) -> dict:
    from lrt_deploy.quant.passes.quantize import quantize_weights_4bit

    context.progress(f"quantising {context.label} to {recipe.describe()}")
    return quantize_weights_4bit(source, target, block_size=recipe.block,
                                 embeddings=recipe.embeddings).to_dict()
