"""Execution-provider choice per deployment target, and a report of what actually runs.

Stock onnxruntime wheels have only the CPU provider, so a request for another one falls back;
:func:`resolve_providers` says what was asked for, what the build has and what will run.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnxruntime as ort

from lrt_deploy.errors import UnknownTargetError

__all__ = [
    "CPU_PROVIDER",
    "TARGETS",
    "TARGET_PROVIDERS",
    "ProviderResolution",
    "UnknownTargetError",
    "canonical_provider_name",
    "check_target_name",
    "fallback_message",
    "providers_for_target",
    "resolve_providers",
]

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"

#: Deployment targets and their execution providers, best first, as manifests record them.
#: Mobile lists every accelerator; :func:`providers_for_target` keeps the running platform's.
TARGET_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": (CPU_PROVIDER,),
    "cuda": ("CUDAExecutionProvider", CPU_PROVIDER),
    "mobile": (
        "NnapiExecutionProvider",
        "CoreMLExecutionProvider",
        "XnnpackExecutionProvider",
        CPU_PROVIDER,
    ),
}
TARGETS = tuple(TARGET_PROVIDERS)
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
# Mobile accelerators that exist on one platform family only.
_PLATFORM_ACCELERATORS = {
    "android": "NnapiExecutionProvider",
    "apple": "CoreMLExecutionProvider",
}


def check_target_name(name: str) -> str:
    """Return ``name`` if it is a known target, else raise :class:`UnknownTargetError`."""
    if name not in TARGET_PROVIDERS:
        raise UnknownTargetError(
            f"unknown target '{name}': choose one of {', '.join(TARGETS)}"
        )
    return name


def _platform_family(platform: str | None) -> str:
    """Map a platform string (``sys.platform`` style or a plain name) to a provider family."""
    if platform is None:
        # Python >= 3.13 reports "android"/"ios"; older Android builds expose getandroidapilevel.
        platform = "android" if hasattr(sys, "getandroidapilevel") else sys.platform
    name = platform.lower()
    if name.startswith("android"):
        return "android"
    if name.startswith(("ios", "darwin", "mac", "ipados")):
        return "apple"
    return "other"


def providers_for_target(
    name: str, platform: str | None = None, *, tensorrt: bool = False
) -> list[str]:
    """The execution providers to request for target ``name``, best first, CPU last.

    Args:
        platform: Platform to choose mobile providers for (``sys.platform`` style); defaults to
            the running one.
        tensorrt: For ``cuda``, put ``TensorrtExecutionProvider`` before CUDA.
    """
    target = check_target_name(name.lower())
    providers = list(TARGET_PROVIDERS[target])
    if target == "mobile":
        keep = _PLATFORM_ACCELERATORS.get(_platform_family(platform))
        others = set(_PLATFORM_ACCELERATORS.values()) - {keep}
        providers = [p for p in providers if p not in others]
    if target == "cuda" and tensorrt:
        providers.insert(0, TENSORRT_PROVIDER)
    return providers


@dataclass(frozen=True)
class ProviderResolution:
    """Providers requested, available in this build, and used (CPU always last), with the
    missing ones and a one-line ``message``."""

    requested: list[str]
    available: list[str]
    used: list[str]
    missing: list[str] = field(default_factory=list)
    fell_back: bool = False
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the resolution as a JSON-ready dict."""
        return asdict(self)


def fallback_message(missing: Sequence[str], available: Sequence[str], used: Sequence[str]) -> str:
    """Describe a provider outcome in one line (used here and by :class:`Session`)."""
    running = f"running on {', '.join(used)}"
    if not missing:
        return running
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"{', '.join(missing)} {verb} not in this onnxruntime build "
        f"(available: {', '.join(available)}); {running}"
    )


def canonical_provider_name(name: str) -> str:
    """onnxruntime's spelling of a provider name, matched case-insensitively; unknown names are
    returned unchanged so that they show up as missing."""
    known = {provider.lower(): provider for provider in ort.get_all_providers()}
    return known.get(name.lower(), name)


def resolve_providers(requested: Sequence[str]) -> ProviderResolution:
    """The requested providers this build has, in order; a WARNING when any is missing."""
    requested = list(dict.fromkeys(canonical_provider_name(p) for p in requested))
    available = list(ort.get_available_providers())
    used = [p for p in requested if p in available and p != CPU_PROVIDER] + [CPU_PROVIDER]
    missing = [p for p in requested if p not in available]
    message = fallback_message(missing, available, used)
    if missing:
        logger.warning(message)
    return ProviderResolution(
        requested=requested,
        available=available,
        used=used,
        missing=missing,
        fell_back=bool(missing),
        message=message,
    )
