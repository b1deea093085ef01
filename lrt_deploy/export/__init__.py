"""Export stage: torch -> ONNX, validation, graph optimisation, int8, mobile packaging."""

from __future__ import annotations

from lrt_deploy.export.targets import TARGET_NAMES, Target, UnknownTargetError

__all__ = ["TARGET_NAMES", "Target", "UnknownTargetError"]
