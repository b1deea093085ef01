"""Run an ONNX model on feeds from an .npz file, write its outputs and the CPU features seen.

Started under qemu as ``python -I worker.py DIR``; imports the standard library, numpy and
onnxruntime only (the ARM64 sysroot has nothing else). ``DIR`` holds ``model_path.txt``,
``feeds.npz`` (``RUN/INPUT``) and ``session_config.json``, and receives ``outputs.npz``
(``RUN/INDEX``) and ``cpu.json`` (x86: CPUID bits, ARM64: HWCAP words, as onnxruntime reads them).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import platform
import sys
from pathlib import Path

# (name, CPUID leaf, subleaf, register 0-3 = eax ebx ecx edx, bit): /proc/cpuinfo names.
_X86_BITS = (
    ("sse4_1", 1, 0, 2, 19), ("sse4_2", 1, 0, 2, 20), ("fma", 1, 0, 2, 12),
    ("osxsave", 1, 0, 2, 27), ("avx", 1, 0, 2, 28), ("avx2", 7, 0, 1, 5),
    ("avx512f", 7, 0, 1, 16), ("avx512bw", 7, 0, 1, 30), ("avx512_vnni", 7, 0, 2, 11),
    ("amx_int8", 7, 0, 3, 25), ("avx_vnni", 7, 1, 0, 4),
)
# Linux arch/arm64 uapi hwcap.h: (name, word 1 or 2, bit).
_ARM_BITS = (
    ("asimd", 1, 1), ("atomics", 1, 8), ("asimdhp", 1, 10), ("asimdrdm", 1, 12),
    ("asimddp", 1, 20), ("sve", 1, 22), ("asimdfhm", 1, 23), ("sve2", 2, 1),
    ("svei8mm", 2, 9), ("i8mm", 2, 13), ("bf16", 2, 14), ("sme", 2, 23), ("sme2", 2, 37),
)
# push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid; mov [r8],eax; mov [r8+4],ebx;
# mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("53 89f8 89f1 4989d0 0fa2 418900 41895804 41894808 4189500c 5b c3")


def _x86_flags() -> tuple[list[str], dict[str, str]]:
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(_CPUID_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                             ctypes.POINTER(ctypes.c_uint32 * 4))(address)
    regs: dict[tuple[int, int], list[int]] = {}
    for leaf, sub in {(b[1], b[2]) for b in _X86_BITS}:
        out = (ctypes.c_uint32 * 4)()
        cpuid(leaf, sub, ctypes.pointer(out))
        regs[leaf, sub] = list(out)
    del cpuid
    flags = [n for n, leaf, sub, reg, bit in _X86_BITS if regs[leaf, sub][reg] >> bit & 1]
    return flags, {f"cpuid_{leaf:x}_{sub}": " ".join(f"{r:08x}" for r in v)
                   for (leaf, sub), v in sorted(regs.items())}


def _arm_flags() -> tuple[list[str], dict[str, str]]:
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    words = {1: getauxval(16), 2: getauxval(26)}  # AT_HWCAP, AT_HWCAP2
    flags = [n for n, word, bit in _ARM_BITS if words[word] >> bit & 1]
    return flags, {"hwcap": f"{words[1]:x}", "hwcap2": f"{words[2]:x}"}


def cpu_report() -> dict:
    """The machine, Python version and int8-relevant CPU flags as onnxruntime sees them."""
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        flags, raw = _x86_flags()
    elif machine in ("aarch64", "arm64"):
        flags, raw = _arm_flags()
    else:
        flags, raw = [], {}
    return {"machine": machine, "python": platform.python_version(), "flags": flags, **raw}


def main(folder: Path) -> None:
    """Run the model in ``folder`` on its feeds, writing ``cpu.json`` before onnxruntime loads."""
    report = cpu_report()
    (folder / "cpu.json").write_text(json.dumps(report))
    import numpy as np
    import onnxruntime as ort

    report["onnxruntime"] = ort.__version__
    report["numpy"] = np.__version__
    (folder / "cpu.json").write_text(json.dumps(report))
    options = ort.SessionOptions()  # onnxruntime's defaults, as an app loads the file
    options.intra_op_num_threads = 1
    config = folder / "session_config.json"
    for key, value in (json.loads(config.read_text()) if config.is_file() else {}).items():
        options.add_session_config_entry(key, value)
    model = (folder / "model_path.txt").read_text()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    runs: dict[int, dict[str, np.ndarray]] = {}
    with np.load(folder / "feeds.npz") as feeds:
        for key in feeds.files:
            run, _, name = key.partition("/")
            runs.setdefault(int(run), {})[name] = feeds[key]
    outputs: dict[str, np.ndarray] = {}
    for run in range(len(runs)):
        for index, value in enumerate(session.run(None, runs[run])):
            outputs[f"{run}/{index}"] = value
    np.savez(folder / "outputs.npz", **outputs)


if __name__ == "__main__":
    if len(sys.argv) == 2:
        main(Path(sys.argv[1]))
    else:
        print(json.dumps(cpu_report()))
