"""Device classes: the CPU families whose onnxruntime int8 kernels compute differently.

On x86 with AVX2 or AVX-512 but no VNNI, the uint8 x int8 kernel adds adjacent product pairs in
int16 (``VPMADDUBSW``) and saturates; the other kernels accumulate in int32. Weights whose
adjacent pairs keep ``|w_k| + |w_k+1| <= 128`` are exact everywhere. Standard library only.
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEVICE_CLASSES", "DeviceClass", "classify_cpu", "device_class", "host_class", "host_cpu_name",
]


@dataclass(frozen=True)
class DeviceClass:
    """One family of CPUs (or a runtime) sharing onnxruntime's int8 arithmetic.

    Attributes:
        name: Stable id written to manifests and reports (``x86-avx2``).
        saturates_u8s8: uint8 x int8 products are added in pairs into int16 and saturate.
        own_int8_kernel: Dynamic int8 runs through a kernel of its own (KleidiAI's, with SME)
            that rounds differently: no weight check proves it exact, only a run can.
    """

    name: str
    title: str
    saturates_u8s8: bool
    own_int8_kernel: bool = False


DEVICE_CLASSES: dict[str, DeviceClass] = {
    c.name: c
    for c in (
        DeviceClass("x86-avx2", "x86 with AVX2, no VNNI (AMD Zen 1-3, Intel Haswell to "
                    "Comet Lake)", True),
        DeviceClass("x86-avx512", "x86 with AVX-512, no VNNI (Intel Skylake-SP/X)", True),
        DeviceClass("x86-vnni", "x86 with AVX-VNNI, AVX-512 VNNI or AMX (Intel Cascade Lake "
                    "and later servers, Alder Lake and later, AMD Zen 4+)", False),
        DeviceClass("x86-sse", "x86 without AVX2 (SSE4.1 kernel)", False),
        DeviceClass("arm64-dotprod", "ARM64 with dot product (most phones since 2018, "
                    "Apple M1)", False),
        DeviceClass("arm64-i8mm", "ARM64 with int8 matrix multiply (Armv8.6+, Apple M2+)",
                    False),
        DeviceClass("arm64-neon", "ARM64 without dot product", False),
        DeviceClass("arm64-sme", "ARM64 with SME (Apple M4, Armv9.2 phones)", False, True),
        DeviceClass("wasm", "WebAssembly (onnxruntime-web in a browser or Node)", False),
    )
}


def device_class(name: str) -> DeviceClass:
    """The class called ``name``; ``KeyError`` names the known ones."""
    try:
        return DEVICE_CLASSES[name]
    except KeyError:
        raise KeyError(f"unknown device class {name!r}: one of {', '.join(DEVICE_CLASSES)}")\
            from None


def classify_cpu(machine: str, flags: set[str] | frozenset[str]) -> str | None:
    """The class of a CPU from ``platform.machine()`` and its ``/proc/cpuinfo`` flags; None
    unless x86-64 or ARM64."""
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "x64"):
        if flags & {"avx512_vnni", "avx_vnni", "amx_int8", "avx10_1"}:
            return "x86-vnni"
        if "avx512bw" in flags:
            return "x86-avx512"
        if "avx2" in flags:
            return "x86-avx2"
        return "x86-sse"
    if machine in ("aarch64", "arm64"):
        if flags & {"sme", "sme2"}:
            return "arm64-sme"
        if "i8mm" in flags:
            return "arm64-i8mm"
        if "asimddp" in flags:
            return "arm64-dotprod"
        return "arm64-neon"
    return None


def _linux_flags() -> set[str]:
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
            break
    return flags


def _darwin_flags() -> set[str]:
    """Apple silicon: every M-series core has dot product; i8mm from M2, SME from M4 (sysctl)."""
    flags = {"asimddp"}
    for flag, key in (("i8mm", "FEAT_I8MM"), ("sme", "FEAT_SME")):
        try:
            out = subprocess.run(["sysctl", "-n", f"hw.optional.arm.{key}"],
                                 capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.stdout.strip() == "1":
            flags.add(flag)
    return flags


@functools.cache
def host_class() -> str | None:
    """This machine's device class (read once per process), or None when it cannot be told."""
    machine = platform.machine()
    if sys.platform.startswith("linux"):
        return classify_cpu(machine, _linux_flags())
    if sys.platform == "darwin" and machine.lower() == "arm64":
        return classify_cpu(machine, _darwin_flags())
    return None


@functools.cache
def host_cpu_name() -> str | None:
    """This machine's CPU model name (``/proc/cpuinfo``'s ``model name``, else
    ``platform.processor()``), or None when neither says."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "model name" and value.strip():
            return " ".join(value.split())
    return platform.processor().strip() or None
