"""Torch-free runtime: run, time and benchmark an exported bundle with onnxruntime and numpy.

Nothing here imports torch, onnx or other ``lrt_deploy`` subpackages (only the stdlib-only
``lrt_deploy.errors``), so an application can ship it with ``numpy`` and ``onnxruntime``
(``tokenizers`` for text input).
"""

from __future__ import annotations

from .contract import (
    SUPPORTED_FORMAT_VERSION,
    BundleContractError,
    UnsupportedFormatVersionError,
    check_manifest,
)
from .limits import ResourceLimitError
from .memory import measure_peak_memory, peak_rss_mb
from .providers import (
    ProviderResolution,
    UnknownTargetError,
    providers_for_target,
    resolve_providers,
)
from .session import InputError, Session, TensorSpec
from .sweep import BenchInputError, BenchResult, benchmark_bundles
from .text import TextEncoder, TextInputError
from .timing import NO_SPINNING, LatencyStats, Schedule, Timings, runner, time_runs

__all__ = [
    "NO_SPINNING",
    "SUPPORTED_FORMAT_VERSION",
    "BenchInputError",
    "BenchResult",
    "BundleContractError",
    "InputError",
    "LatencyStats",
    "ProviderResolution",
    "ResourceLimitError",
    "Schedule",
    "Session",
    "TensorSpec",
    "TextEncoder",
    "TextInputError",
    "Timings",
    "UnknownTargetError",
    "UnsupportedFormatVersionError",
    "benchmark_bundles",
    "check_manifest",
    "measure_peak_memory",
    "peak_rss_mb",
    "providers_for_target",
    "resolve_providers",
    "runner",
    "time_runs",
]
