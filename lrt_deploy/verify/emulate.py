"""Run an ONNX model as another CPU device class computes it, under qemu user emulation.

onnxruntime picks its int8 kernel from the CPU features it reads at run time (CPUID on x86,
HWCAP on ARM64), and qemu's user mode emulates those for the CPU model it is given; each run
checks that the worker saw the class asked for, so a wrong CPU model cannot pass for it.
Standard library and numpy only.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrt_deploy.errors import LrtDeployError
from lrt_deploy.runtime.devices import DEVICE_CLASSES, classify_cpu

__all__ = ["EMULATED", "NOT_EMULATED", "EmulatedRuns", "EmulationError", "Emulator",
           "devices_dir", "qemu_binary", "run_model", "unavailable"]

WORKER = Path(__file__).with_name("worker.py")
SETUP = "run scripts/setup_devices.sh in a checkout (LRT_DEVICES_DIR names its .devices)"


class EmulationError(LrtDeployError):
    """An emulated run could not start, failed or computed on the wrong CPU class."""


@dataclass(frozen=True)
class Emulator:
    """How one device class is emulated: guest ``machine``, qemu ``-cpu`` value and binary.

    Attributes:
        midr: ARM64: MIDR_EL1 for the guest's /proc/cpuinfo. onnxruntime's cpuinfo trusts the
            part number as well as HWCAP (dot product on for any Neoverse N1 part), so it
            must match ``cpu``.
        features: ARM64: the /proc/cpuinfo Features line (for people; HWCAP is what counts).
        binary: qemu user binary under :func:`devices_dir`, tried before the system's
            ``qemu-MACHINE-static``.
        min_qemu: Lowest qemu major version that runs the class right (0: any).
    """

    name: str
    machine: str
    cpu: str
    note: str
    midr: int = 0
    features: str = ""
    binary: str = ""
    min_qemu: int = 0

    @property
    def qemu(self) -> str:
        """The system binary's name."""
        return f"qemu-{self.machine}-static"


EMULATED: dict[str, Emulator] = {
    e.name: e
    for e in (
        Emulator("x86-avx2", "x86_64", "Haswell", "AVX2 + FMA, no AVX-512 or VNNI: the "
                 "saturating VPMADDUBSW kernel"),
        Emulator("x86-sse", "x86_64", "Nehalem", "SSE4.2, no AVX: the exact SSE4.1 kernel"),
        Emulator("arm64-dotprod", "aarch64", "neoverse-n1", "Armv8.2 with dot product "
                 "(SDOT/UDOT), no i8mm, no SVE", 0x414FD0C1,
                 "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                 "asimdrdm lrcpc dcpop asimddp ssbs"),
        # qemu 7.2 has no Armv8.6 model without SVE: "max" less SVE and SME has i8mm. SME
        # would switch DynamicQuantizeMatMul to KleidiAI's kernel (that is arm64-sme).
        Emulator("arm64-i8mm", "aarch64", "max,sve=off,sme=off", "Armv8.6+ with i8mm "
                 "(SMMLA/UMMLA), SVE and SME off", 0x000F0510,
                 "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                 "asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 asimdfhm dit "
                 "uscat ilrcpc flagm sb paca pacg dcpodp flagm2 frint i8mm bf16 rng bti"),
        Emulator("arm64-neon", "aarch64", "cortex-a72", "Armv8.0 NEON, no dot product",
                 0x410FD083, "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
        # qemu 7.2 executes KleidiAI's SME kernel wrongly; qemu has no SME without SVE. SVE's
        # vector length changes float results (SME's does not): 128 bits, as Armv9 phones have.
        Emulator("arm64-sme", "aarch64", "max,sve-default-vector-length=16,"
                 "sme-default-vector-length=64", "Armv9 with SVE2 (128-bit) and SME "
                 "(512-bit): KleidiAI's SME int8 kernel; qemu >= 10", 0x000F0510,
                 "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                 "asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit "
                 "uscat ilrcpc flagm sb paca pacg dcpodp sve2 sveaes svepmull svebitperm "
                 "svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 i8mm bf16 rng "
                 "bti mte mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 smeb16f32 smef32f32 "
                 "smefa64 mops hbc", binary="qemu10/qemu-aarch64", min_qemu=10),
    )
}

NOT_EMULATED: dict[str, str] = {
    "x86-avx512": "qemu's TCG emulates no AVX-512 (no CPU model, max included, reports "
                  "avx512f in qemu 7.2): run on an AVX-512 machine without VNNI (Skylake-SP)",
    "x86-vnni": "qemu's TCG emulates neither AVX-512 VNNI nor AVX-VNNI (qemu 7.2 max: "
                "no avx_vnni): run on a VNNI machine (Ice Lake+, Zen 4+)",
    # used when no qemu >= 10 is found
    "arm64-sme": "needs qemu >= 10 (Debian stable's 7.2 executes onnxruntime's SME int8 kernel "
                 "wrongly) and none was found: run scripts/setup_devices.sh (it unpacks "
                 "bookworm-backports' qemu-aarch64 into .devices/qemu10), or run on an SME "
                 "device (Apple M4, Armv9.2 phones)",
    "wasm": "WebAssembly is not a qemu target: run the bundle in Node with onnxruntime-web "
            "(samples/js)",
}


class EmulatedRuns(list):
    """Each run's outputs, with ``cpu``: the worker's CPU report (machine, flags, versions)."""

    cpu: dict


def devices_dir() -> Path:
    """Where ``scripts/setup_devices.sh`` put the sysroots: ``$LRT_DEVICES_DIR`` or ``.devices``."""
    env = os.environ.get("LRT_DEVICES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".devices"


def _arm64_root() -> Path:
    return devices_dir() / "arm64" / "root"


@functools.lru_cache(maxsize=16)
def _qemu_major(path: str, mtime: float) -> int:
    """The major version ``path --version`` reports (0 when it does not run); ``mtime`` keys
    the cache."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                             check=False, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    found = re.match(r"qemu-\S+ version (\d+)\.", out)
    return int(found.group(1)) if found else 0


def qemu_binary(emulator: Emulator) -> str | None:
    """The qemu user binary that runs ``emulator`` (its own, else the system's), at
    ``min_qemu`` or later; None when there is none."""
    candidates = [str(devices_dir() / emulator.binary)] if emulator.binary else []
    candidates.append(shutil.which(emulator.qemu) or "")
    for path in candidates:
        if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
            continue
        if emulator.min_qemu == 0 or \
                _qemu_major(path, os.stat(path).st_mtime) >= emulator.min_qemu:
            return path
    return None


def _is_x86_host() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux")


def unavailable(name: str) -> str | None:
    """None when class ``name`` can run here under emulation, else why not and what to do."""
    if name not in EMULATED:
        if name in NOT_EMULATED:
            return f"{name} cannot be emulated: {NOT_EMULATED[name]}"
        if name in DEVICE_CLASSES:
            return f"{name} cannot be emulated"
        return f"unknown device class {name!r}: one of {', '.join(DEVICE_CLASSES)}"
    emulator = EMULATED[name]
    if not sys.platform.startswith("linux"):
        return f"{name}: qemu user emulation needs Linux (this is {sys.platform})"
    if qemu_binary(emulator) is None:
        if name in NOT_EMULATED:
            return f"{name} cannot be emulated here: {NOT_EMULATED[name]}"
        return f"{emulator.qemu} not found: {SETUP} (Debian's qemu-user-static)"
    if emulator.machine == "x86_64":
        if not _is_x86_host():
            return f"{name}: x86 emulation runs this Python under qemu, so it needs an x86-64 "\
                   f"Linux host (this is {platform.machine()})"
        return None
    root = _arm64_root()
    missing = [p for p in ("usr/bin/python3.11", "usr/lib/python3/dist-packages/onnxruntime",
                           "usr/lib/python3/dist-packages/numpy")
               if not (root / p).exists()]
    if missing:
        return f"ARM64 sysroot incomplete ({root / missing[0]} missing): {SETUP}"
    return None


def _command(emulator: Emulator, folder: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    qemu = qemu_binary(emulator) or emulator.qemu
    if emulator.machine == "x86_64":
        python = sys.executable
        prefix = [qemu, "-cpu", emulator.cpu]
    else:
        # onnxruntime's cpuinfo aborts on the host's x86 /proc/cpuinfo: -L resolves guest
        # paths in a linked view of the sysroot with its own /proc/cpuinfo (no root needed).
        root = folder / "sysroot"
        _arm64_view(emulator, root)
        python = str(root / "usr/bin/python3.11")
        prefix = [qemu, "-L", str(root), "-cpu", emulator.cpu]
        for key in ("LD_LIBRARY_PATH", "LD_PRELOAD"):  # host libraries: wrong architecture
            env.pop(key, None)
    return [*prefix, python, "-I", str(WORKER), str(folder)], env


def _arm64_view(emulator: Emulator, view: Path) -> None:
    view.mkdir()
    for entry in _arm64_root().iterdir():
        if entry.name != "proc":
            (view / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (view / "proc").mkdir()
    midr = emulator.midr
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {emulator.features}\n"
             f"CPU implementer\t: 0x{midr >> 24:02x}\nCPU architecture: 8\n"
             f"CPU variant\t: 0x{midr >> 20 & 0xF:x}\nCPU part\t: 0x{midr >> 4 & 0xFFF:03x}\n"
             f"CPU revision\t: {midr & 0xF}\n\n")
    # one entry per CPU the host's /sys lists, so cpuinfo's counts agree
    count = os.cpu_count() or 1
    (view / "proc" / "cpuinfo").write_text("".join(f"processor\t: {i}\n{block}"
                                                 for i in range(count)))


def _tail(text: str, lines: int = 6) -> str:
    kept = [line.strip() for line in text.strip().splitlines()
            if line.strip() and "TCG doesn't support requested feature" not in line]
    return " | ".join(kept[-lines:]) or "(no stderr)"


def run_model(name: str, model: Path, feeds: Sequence[Mapping[str, np.ndarray]], *,
              timeout: float = 900, session_config: Mapping[str, str] | None = None
              ) -> EmulatedRuns:
    """Each feed's outputs from ``model`` as class ``name`` computes them, in one emulated
    process: onnxruntime's default options, one thread, plus ``session_config`` entries.

    Raises :class:`EmulationError` when the class cannot run here, the run fails, or the
    emulated CPU does not classify as ``name``.
    """
    reason = unavailable(name)
    if reason is not None:
        raise EmulationError(reason)
    emulator = EMULATED[name]
    model = Path(model).resolve()
    if not model.is_file():
        raise EmulationError(f"model file not found: {model}")
    with tempfile.TemporaryDirectory(prefix="lrt-emulate-") as tmp:
        folder = Path(tmp)
        (folder / "model_path.txt").write_text(str(model))
        (folder / "session_config.json").write_text(json.dumps(dict(session_config or {})))
        arrays: dict[str, np.ndarray] = {}
        for run, feed in enumerate(feeds):
            for key, value in feed.items():
                arrays[f"{run}/{key}"] = np.asarray(value)
        np.savez(folder / "feeds.npz", **arrays)
        command, env = _command(emulator, folder)
        qemu = Path(command[0]).name
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  env=env, check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise EmulationError(f"{name}: {qemu} -cpu {emulator.cpu} ran past "
                                 f"{timeout:g} s on {model.name}") from None
        except OSError as exc:
            raise EmulationError(f"{name}: cannot start {qemu}: {exc}") from None
        if done.returncode != 0 or not (folder / "outputs.npz").is_file():
            raise EmulationError(f"{name}: worker under {qemu} -cpu {emulator.cpu} "
                                 f"exited {done.returncode}: {_tail(done.stderr)}")
        report = json.loads((folder / "cpu.json").read_text())
        seen = classify_cpu(report.get("machine", ""), set(report.get("flags", ())))
        if seen != name:
            raise EmulationError(f"{name}: {qemu} -cpu {emulator.cpu} reported "
                                 f"{report.get('machine')} with {' '.join(report['flags'])}, "
                                 f"which is {seen}, not {name}")
        runs = EmulatedRuns()
        with np.load(folder / "outputs.npz") as out:
            count = len({key.partition("/")[0] for key in out.files})
            for run in range(count):
                n = sum(1 for key in out.files if key.partition("/")[0] == str(run))
                runs.append([out[f"{run}/{i}"] for i in range(n)])
        runs.cpu = report
        return runs
