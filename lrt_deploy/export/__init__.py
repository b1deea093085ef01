"""Export stage: torch -> ONNX, validation, graph optimisation, int8, mobile packaging.

Passes, one per module: ``onnx_export`` (torch -> ONNX), ``validate``, ``fusion``
(``fuse_transformer``: onnxscript's rewriter + ``fuse_attention``'s mask pass + ORT
``extended``), ``optimize``,
``quantize`` (dynamic int8, static QDQ int8, sensitivity, 4-bit weights), ``float16`` (cuda),
``mobile`` (ORT format), ``external_data`` (> 2 GB models), ``reproducibility``,
``dense_equivalent`` (the dense baseline of a model low-rank by design: its low-rank MatMul
pairs folded into one, and ``by_design_baseline`` to plan it).
Composed per target: ``precision`` (typed recipes and their passes), ``targets`` (presets),
``build`` (export -> validate -> optimise -> precision, per model), ``bundle`` (manifest and
atomic write).
"""

from __future__ import annotations

from lrt_deploy.export.targets import TARGET_NAMES, Target, UnknownTargetError
from lrt_deploy.quant.recipes import (
    DynamicInt8,
    Float16,
    Int4WeightOnly,
    Int8WeightOnly,
    Precision,
    StaticInt8,
    precision_from_dict,
)

__all__ = [
    "TARGET_NAMES",
    "DynamicInt8",
    "Float16",
    "Int4WeightOnly",
    "Int8WeightOnly",
    "Precision",
    "StaticInt8",
    "Target",
    "UnknownTargetError",
    "precision_from_dict",
]
