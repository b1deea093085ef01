"""Run an ONNX model as another device class computes it, under qemu user emulation.

onnxruntime picks its int8 kernel by the CPU features it reads at run time (CPUID on x86, the
kernel's HWCAP words on ARM64), and qemu's user mode emulates those for the CPU model it is
given. So the host's own Python under ``qemu-x86_64-static -cpu Haswell`` runs the AVX2 kernel
(which saturates), and an ARM64 Python with onnxruntime for aarch64 (the sysroot that
``scripts/setup_devices.sh`` builds under ``.devices/arm64``) under ``qemu-aarch64-static -cpu
neoverse-n1`` runs the dot-product kernel. ``arm64-sme`` needs qemu >= 10 (Debian stable's 7.2
executes onnxruntime's SME kernel wrongly): the ``qemu-aarch64`` binary that
``setup_devices.sh`` unpacks from Debian's backports into ``.devices/qemu10``, or the system's
``qemu-aarch64-static`` where that is already 10 or later. The caller runs the host's own class
natively.

Each :func:`run_model` call starts one emulated process (:mod:`lrt_deploy.verify.worker`, run
by file path with ``python -I``) that loads the model with onnxruntime's default session
options (one intra-op thread) and runs every feed; arrays travel as ``.npz`` files in a
temporary folder. The worker also reports the CPU features it saw; a run whose features do
not classify as the class asked for raises :class:`EmulationError`, so a wrong qemu CPU model
cannot pass for the class.

Standard library and numpy only (:mod:`lrt_deploy.runtime.devices` for the classifier).
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
SETUP = "run scripts/setup_devices.sh"


class EmulationError(LrtDeployError):
    """An emulated run could not start, failed or computed on the wrong CPU class."""


@dataclass(frozen=True)
class Emulator:
    """How one device class is emulated.

    Attributes:
        name: The device class (``lrt_deploy.runtime.devices``).
        machine: ``x86_64`` or ``aarch64``: the guest architecture.
        cpu: qemu's ``-cpu`` value.
        note: What the CPU model stands for, in a few words.
        midr: ARM64: the CPU model's MIDR_EL1, for the guest's /proc/cpuinfo. onnxruntime's
            cpuinfo takes the ISA from HWCAP but also trusts the part number (it turns dot
            product on for any Neoverse N1 or Cortex-A76 part), so it must match ``cpu``.
        features: ARM64: the /proc/cpuinfo Features line (for people; HWCAP is what counts).
        binary: The qemu user binary to use, relative to :func:`devices_dir` (tried first);
            empty: the system's ``qemu-MACHINE-static`` on PATH.
        min_qemu: The lowest qemu major version that runs the class right (0: any); a binary
            below it, ``binary`` or the system's, does not count.
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
        """The system binary's name (what messages call it when ``binary`` is not found)."""
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
        # qemu 7.2 has no Armv8.6 CPU model without SVE; "max" less SVE and SME has i8mm.
        # Its MIDR is qemu's own (implementer 0, part 'Q'), so no errata table matches it.
        # Not SME devices: with SME, onnxruntime 1.31 runs DynamicQuantizeMatMul through
        # another (KleidiAI) kernel that computes differently (arm64-sme). SVE alone changes
        # nothing.
        Emulator("arm64-i8mm", "aarch64", "max,sve=off,sme=off", "Armv8.6+ with i8mm "
                 "(SMMLA/UMMLA), SVE and SME off", 0x000F0510,
                 "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                 "asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 asimdfhm dit "
                 "uscat ilrcpc flagm sb paca pacg dcpodp flagm2 frint i8mm bf16 rng bti"),
        Emulator("arm64-neon", "aarch64", "cortex-a72", "Armv8.0 NEON, no dot product",
                 0x410FD083, "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
        # qemu 10.0's "max": Armv9 with SVE2 and SME (FEAT_SME, no SME2: HWCAP2 bit 23, not
        # 37), so onnxruntime 1.31 takes KleidiAI's SME kernel for DynamicQuantizeMatMul.
        # qemu 7.2 executes that kernel wrongly (garbage), qemu 10.0.2 right. qemu has no SME
        # without SVE (sve=off drops it). The SME vector length (128-2048 bits) changes no
        # result bit; SVE's does (onnxruntime's SVE float kernels: cosine 0.9996 on MiniLM
        # between 128 and qemu's default 512 bits). So SVE at 128 bits, as every Armv9 phone
        # core has it, and SME at 512 (Apple M4, Arm C1-Ultra; qemu's default is 256). Apple
        # M4 has no SVE: no qemu model matches it exactly.
        # MIDR: qemu's own for max, as for arm64-i8mm; Features: the HWCAP words it reports.
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
    # the reason when no qemu >= 10 is found (EMULATED has the class otherwise)
    "arm64-sme": "needs qemu >= 10 (Debian stable's 7.2 executes onnxruntime's SME int8 kernel "
                 "wrongly) and none was found: run scripts/setup_devices.sh (it unpacks "
                 "bookworm-backports' qemu-aarch64 into .devices/qemu10), or run on an SME "
                 "device (Apple M4, Armv9.2 phones)",
    "wasm": "WebAssembly is not a qemu target: run the bundle in Node with onnxruntime-web "
            "(samples/js)",
}


class EmulatedRuns(list):
    """The outputs of each run (a list of lists of arrays), with ``cpu``: what the worker
    reported (``machine``, ``flags``, ``onnxruntime``, raw CPUID or HWCAP words)."""

    cpu: dict


def devices_dir() -> Path:
    """Where ``scripts/setup_devices.sh`` put the sysroots: ``$LRT_DEVICES_DIR``, else the
    checkout's ``.devices``."""
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
    """The qemu user binary that runs ``emulator``: its own ``binary`` under
    :func:`devices_dir`, else the system's ``qemu-MACHINE-static``; None when neither is
    there at ``min_qemu`` or later."""
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
    """None when class ``name`` can run here under emulation, else one line saying why not
    and what to do."""
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
        # -L makes the guest's absolute paths (the dynamic loader, libraries, /proc/cpuinfo)
        # resolve under the sysroot first, where they exist there. onnxruntime's cpuinfo
        # aborts on the host's x86 /proc/cpuinfo, so each run gets a view of the sysroot
        # (links) with a /proc/cpuinfo for its CPU model: no bind mount, no root needed.
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
              timeout: float = 900) -> EmulatedRuns:
    """Run ONNX ``model`` once per feed dict as device class ``name`` computes it.

    onnxruntime's default session options (what an app that loads the file gets) with one
    intra-op thread, CPU provider. Returns each run's outputs in the graph's output order
    (``EmulatedRuns``, a list, also carries the worker's CPU report as ``.cpu``). Raises
    :class:`EmulationError` with a one-line reason when the class cannot run here, the run
    fails or times out, or the emulated CPU does not classify as ``name``.
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
