"""Export stage: torch -> ONNX, validation, graph passes, mobile packaging, bundle writing.

``onnx_export`` (torch -> ONNX), ``validate`` (against PyTorch), ``passes/`` (one module per
graph pass), ``by_design`` (the baseline of a model low-rank by design), ``build`` (the passes
and precision per model, in order), ``mobile`` (ORT format, operator config, usability),
``targets`` (presets), ``runtimes`` (which runtimes read a graph), ``bundle`` (manifest and
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
