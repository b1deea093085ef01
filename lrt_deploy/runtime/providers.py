"""Execution-provider choice per deployment target, with honest fallback reporting.

The stock ``onnxruntime`` wheel from PyPI ships only the CPU provider (plus Azure). Mobile and
GPU providers exist only in dedicated builds, so a bundle exported for ``mobile`` asks for
XNNPACK/NNAPI/CoreML and, on a desktop, silently ends up on CPU. :func:`resolve_providers`
makes that visible: it says what was asked for, what the build has, and what will run.
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

#: The one table of deployment targets and their execution providers, best first. Export
#: (``lrt_deploy.export.targets``) writes these into the manifest; the runtime requests them.
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
    """Return the execution providers to request for a deployment target, best first.

    Args:
        name: Target name: ``"cpu"``, ``"cuda"`` or ``"mobile"`` (case-insensitive).
        platform: Platform to choose mobile providers for (``"android"``, ``"ios"``,
            ``"darwin"``, ``"linux"``, ...). Defaults to the running platform.
        tensorrt: For ``cuda``, put ``TensorrtExecutionProvider`` before CUDA.

    Returns:
        Provider names in priority order; ``CPUExecutionProvider`` is always last.

    Raises:
        UnknownTargetError: If ``name`` is not a known target.
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
    """What was requested, what this onnxruntime build offers, and what will be used.

    Attributes:
        requested: Providers asked for, in priority order.
        available: Providers compiled into this onnxruntime build.
        used: Requested providers that are available, with CPU always last.
        missing: Requested providers that are not available.
        fell_back: True when at least one requested provider is missing.
        message: One human-readable line describing the outcome.
    """

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
    """Return onnxruntime's spelling of a provider name, matched case-insensitively.

    Manifests and users often write ``XNNPACKExecutionProvider`` or ``cudaexecutionprovider``;
    onnxruntime only accepts its own spelling (``XnnpackExecutionProvider``). Unknown names are
    returned unchanged so they show up as missing rather than disappearing.
    """
    known = {provider.lower(): provider for provider in ort.get_all_providers()}
    return known.get(name.lower(), name)


def resolve_providers(requested: Sequence[str]) -> ProviderResolution:
    """Intersect requested providers with the ones this onnxruntime build has.

    A WARNING is logged whenever a requested provider is missing, so the fallback is never
    silent. Names are normalised with :func:`canonical_provider_name` first.

    Args:
        requested: Provider names in priority order (e.g. from :func:`providers_for_target`).

    Returns:
        The :class:`ProviderResolution`; pass its ``used`` list to ``InferenceSession``.
    """
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
