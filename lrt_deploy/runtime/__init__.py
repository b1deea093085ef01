"""Torch-free runtime: run an exported bundle with onnxruntime and numpy only.

Nothing here imports torch, onnx or other ``lrt_deploy`` subpackages (only the dependency-free
``lrt_deploy.errors``), so an application can ship this package with just ``numpy`` and
``onnxruntime`` (``tokenizers`` for text input).
"""

from __future__ import annotations

from .benchmark import LatencyStats, ModelMeasurement, measure_latency, measure_model, peak_rss_mb
from .providers import (
    ProviderResolution,
    UnknownTargetError,
    providers_for_target,
    resolve_providers,
)
from .session import InputError, Session, TensorSpec
from .text import TextEncoder

__all__ = [
    "InputError",
    "LatencyStats",
    "ModelMeasurement",
    "ProviderResolution",
    "Session",
    "TensorSpec",
    "TextEncoder",
    "UnknownTargetError",
    "measure_latency",
    "measure_model",
    "peak_rss_mb",
    "providers_for_target",
    "resolve_providers",
]
