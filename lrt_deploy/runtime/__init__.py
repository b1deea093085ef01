"""Torch-free runtime: run an exported bundle with onnxruntime and numpy only.

Nothing here imports torch, onnx or other ``lrt_deploy`` subpackages (only the stdlib-only
``lrt_deploy.errors``), so an application can ship this package with just ``numpy`` and
``onnxruntime`` (``tokenizers`` for text input). ``lrt-bench`` (:mod:`.bench_cli`) lives here
for the same reason: it runs wherever the bundle runs.
"""

from __future__ import annotations

from .bench import BenchInputError, BenchResult, RunStats, benchmark_bundles
from .benchmark import (
    LatencyStats,
    ModelMeasurement,
    measure_interleaved,
    measure_latency,
    measure_model,
    peak_rss_mb,
)
from .contract import (
    SUPPORTED_FORMAT_VERSION,
    BundleContractError,
    UnsupportedFormatVersionError,
    check_manifest,
)
from .limits import ResourceLimitError
from .providers import (
    ProviderResolution,
    UnknownTargetError,
    providers_for_target,
    resolve_providers,
)
from .session import InputError, Session, TensorSpec
from .text import TextEncoder, TextInputError

__all__ = [
    "SUPPORTED_FORMAT_VERSION",
    "BenchInputError",
    "BenchResult",
    "BundleContractError",
    "InputError",
    "LatencyStats",
    "ModelMeasurement",
    "ProviderResolution",
    "ResourceLimitError",
    "Session",
    "TensorSpec",
    "TextEncoder",
    "TextInputError",
    "RunStats",
    "UnknownTargetError",
    "UnsupportedFormatVersionError",
    "benchmark_bundles",
    "check_manifest",
    "measure_interleaved",
    "measure_latency",
    "measure_model",
    "peak_rss_mb",
    "providers_for_target",
    "resolve_providers",
]
