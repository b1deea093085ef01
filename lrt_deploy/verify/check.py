"""What a bundle computes on each device class, against the dense model and between classes.

A text bundle carries ``verification.npz``: held-out sentences (token ids, padded rows) and the
dense fp32 PyTorch model's outputs on them. :func:`verify_model` runs the deployed model on a
sample of those sentences, one sentence per run, on every device class it can reach — this host
natively, other CPU classes under qemu (:mod:`lrt_deploy.verify.emulate`), WebAssembly in Node
(:mod:`lrt_deploy.verify.wasm`) — with onnxruntime's default session options and one thread, and
scores each class against the dense outputs and against every other class. A class that cannot
run here is listed with the reason; :func:`lrt_deploy.quant.kernels.exact_classes` says which
classes the weights make exact without running.

Standard library, numpy and onnxruntime only: ``lrt-verify`` runs without torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.errors import BundleError
from lrt_deploy.runtime.devices import DEVICE_CLASSES, host_class
from lrt_deploy.verify.emulate import EMULATED, NOT_EMULATED, EmulationError, run_model, unavailable
from lrt_deploy.verify.wasm import run_wasm, wasm_unavailable

__all__ = [
    "REFERENCE_FILE",
    "REFERENCE_SENTENCES",
    "SAMPLE_SENTENCES",
    "SETS",
    "CLASSES_ENV",
    "ClassCheck",
    "DeviceVerification",
    "default_classes",
    "read_reference",
    "verify_model",
    "write_reference",
]

#: The bundle file holding the held-out token ids and the dense model's outputs on them.
REFERENCE_FILE = "verification.npz"
#: Sentences of each held-out set run on every class (one per run): under emulation a run
#: costs ~1 s of the ~15 s a class takes, most of it qemu starting Python and onnxruntime.
SAMPLE_SENTENCES = 8
#: Sentences of each held-out set stored in ``verification.npz`` (``lrt-verify --sample`` can
#: run up to this many; ~0.3 MB per bundle).
REFERENCE_SENTENCES = 64
#: The held-out sets, by key: the shipped files they come from.
SETS = {"heldout": "heldout.txt", "domain": "heldout_domain.txt"}

ProgressFn = Callable[[str], None]
#: Environment variable limiting the classes run when none are named: a comma list, or
#: ``host`` for this machine's class alone (the test suite sets it: emulation is slow).
CLASSES_ENV = "LRT_VERIFY_CLASSES"


def default_classes() -> list[str]:
    """The classes to list when the caller names none: ``$LRT_VERIFY_CLASSES`` or all."""
    import os

    value = os.environ.get(CLASSES_ENV, "").strip()
    if not value:
        return list(DEVICE_CLASSES)
    host = host_class()
    return [host or "host" if name.strip() == "host" else name.strip()
            for name in value.split(",") if name.strip()]


def write_reference(path: Path, sets: Mapping[str, tuple[Mapping[str, np.ndarray], np.ndarray]]
                    ) -> None:
    """Write ``verification.npz``: per set, the padded input rows (``<set>/<input>``, int64,
    ``attention_mask`` among them) and the dense outputs (``<set>/reference``, float32)."""
    arrays: dict[str, np.ndarray] = {}
    for name, (feeds, reference) in sets.items():
        for key, value in feeds.items():
            arrays[f"{name}/{key}"] = np.asarray(value, np.int64)
        arrays[f"{name}/reference"] = np.asarray(reference, np.float32)
    np.savez(path, **arrays)


def read_reference(path: Path) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """The sets of ``verification.npz`` (no pickles); :class:`BundleError` when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"cannot read {Path(path).name}: {exc}; re-export the bundle") from None
    sets: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    found = {k.partition("/")[0] for k in arrays}
    for key in [*(k for k in SETS if k in found), *sorted(found - set(SETS))]:
        feeds = {k.partition("/")[2]: v for k, v in arrays.items()
                 if k.startswith(f"{key}/") and k != f"{key}/reference"}
        reference = arrays.get(f"{key}/reference")
        rows = {v.shape[0] for v in feeds.values() if v.ndim == 2}
        if (reference is None or "attention_mask" not in feeds or len(rows) != 1
                or any(v.ndim != 2 or v.dtype != np.int64 for v in feeds.values())
                or reference.shape[0] not in rows):
            raise BundleError(f"{Path(path).name} set {key!r} is malformed: re-export the bundle")
        sets[key] = (feeds, reference)
    if not sets:
        raise BundleError(f"{Path(path).name} holds no sentences: re-export the bundle")
    return sets


@dataclass
class ClassCheck:
    """One device class: how it was run, its fidelity per set, its agreement with the host.

    Attributes:
        name: Device class (:data:`DEVICE_CLASSES`).
        title: Who has it.
        how: ``native``, ``qemu -cpu Haswell``, ``onnxruntime-web in Node``... or ``-``.
        exact_kernel: The weight check proves its int8 kernel exact (``exact_classes``).
        verified: It ran here.
        reason: Why not, when it did not.
        figures: Per set, ``mean`` and ``worst`` cosine to the dense model.
        agreement: Worst cosine of its outputs to the host's, per sentence.
        seconds: Wall time of its runs.
    """

    name: str
    title: str
    how: str
    exact_kernel: bool
    verified: bool
    reason: str | None = None
    figures: dict[str, dict[str, float]] = field(default_factory=dict)
    agreement: float | None = None
    seconds: float | None = None


@dataclass
class DeviceVerification:
    """The table: every device class, and the worst agreement between any two that ran."""

    host: str | None
    model: str
    sample: dict[str, int]
    classes: list[ClassCheck]
    worst_agreement: float | None
    worst_pair: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceVerification:
        fields = dict(data)
        fields["classes"] = [ClassCheck(**c) for c in fields.get("classes", [])]
        return cls(**fields)

    def check(self, name: str) -> ClassCheck | None:
        return next((c for c in self.classes if c.name == name), None)

    def failures(self, floor: float | None, strict: bool = False) -> list[str]:
        """What misses: a class that ran with a mean cosine under ``floor`` on a set; with
        ``strict``, also a class that did not run and that the weight check does not prove."""
        missed = []
        for c in self.classes:
            if c.verified and floor is not None:
                low = [f"{s} {f['mean']:.4f}" for s, f in c.figures.items() if f["mean"] < floor]
                if low:
                    missed.append(f"{c.name} below {floor:g} ({', '.join(low)})")
            elif not c.verified and strict and not c.exact_kernel:
                missed.append(f"{c.name} not verified ({c.reason})")
        return missed

    def table(self) -> tuple[list[str], list[list[str]], str]:
        """Headers, rows and the caption of the device table (Markdown and HTML render it)."""
        sets = list(self.sample)
        headers = ["Device class", "How", "int8 kernel exact"] + [
            f"{SETS.get(s, s)} mean / worst" for s in sets] + ["Agreement with host", "Seconds"]
        rows = []
        for c in self.classes:
            row = [c.name + (" (this host)" if c.name == self.host else ""), c.how,
                   "yes" if c.exact_kernel else "no"]
            if c.verified:
                row += [f"{c.figures[s]['mean']:.4f} / {c.figures[s]['worst']:.4f}"
                        for s in sets]
                row += [f"{c.agreement:.5f}" if c.agreement is not None else "-",
                        f"{c.seconds:.1f}" if c.seconds is not None else "-"]
            else:
                row += [f"not verified: {c.reason}"] + ["-"] * (len(sets) + 1)
            rows.append(row)
        counts = ", ".join(f"{n} of {SETS.get(s, s)}" for s, n in self.sample.items())
        caption = (
            f"Cosine to the dense fp32 model on {counts}, one sentence per run, {self.model} "
            "loaded with onnxruntime's default session options, one thread. "
            + (f"Worst agreement between two classes: {self.worst_agreement:.5f} "
               f"({' vs '.join(self.worst_pair)}). " if self.worst_agreement is not None else "")
            + f"{self.seconds:.0f} s in all.")
        return headers, rows, caption

    def markdown(self) -> list[str]:
        """The device table and its caption, as Markdown lines."""
        headers, rows, caption = self.table()
        lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return [*lines, "", caption]


def _cosines(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    x = np.stack([np.asarray(v, np.float64).ravel() for v in a])
    y = np.stack([np.asarray(v, np.float64).ravel() for v in b])
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return (x * y).sum(axis=1) / np.where(norms == 0, 1.0, norms)


def _sample_feeds(sets: Mapping[str, tuple[dict[str, np.ndarray], np.ndarray]], sample: int,
                  inputs: Mapping[str, list[Any]]) -> tuple[list[dict[str, np.ndarray]],
                                                           list[np.ndarray], dict[str, int]]:
    """One feed per sentence (trimmed to its length unless the graph fixes the sequence axis),
    its dense reference row (likewise trimmed), and the count per set."""
    feeds, references, counts = [], [], {}
    for name, (rows, reference) in sets.items():
        count = min(sample, reference.shape[0])
        counts[name] = count
        for i in range(count):
            length = int(rows["attention_mask"][i].sum())
            feed = {}
            for key, shape in inputs.items():
                if key not in rows:
                    raise BundleError(f"the model's input {key!r} is not in {REFERENCE_FILE}: "
                                      "re-export the bundle")
                fixed = len(shape) > 1 and isinstance(shape[1], int)
                feed[key] = rows[key][i : i + 1, : None if fixed else length]
            feeds.append(feed)
            row = reference[i]
            references.append(row[:length] if row.ndim >= 2 and reference.ndim == 3 else row)
    return feeds, references, counts


def _host_session(model: Path) -> Any:
    """The model in this host's onnxruntime: default options, one thread (as emulated classes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BundleError(f"cannot open {model.name}: {reason}; re-export the bundle") from None


def verify_model(
    model: Path,
    reference: Path,
    exact_on: Sequence[str],
    *,
    classes: Sequence[str] | None = None,
    sample: int = SAMPLE_SENTENCES,
    jobs: int = 2,
    progress: ProgressFn = lambda _line: None,
) -> DeviceVerification:
    """Run ``model`` on ``sample`` sentences of each set of ``reference`` on every class in
    ``classes`` (default: all) that can run here, ``jobs`` emulated classes at a time.

    Args:
        model: The bundle's model file (``.onnx`` or ``.ort``).
        reference: Its ``verification.npz``.
        exact_on: The classes the weight check proves exact (``exact_classes``).
        classes: Device classes to list (default :func:`default_classes`); unknown names
            raise ``BundleError``.
        sample: Sentences per set.
        jobs: Emulated classes run at once (each is one process).
        progress: Called with a line as each class finishes.
    """
    started = time.perf_counter()
    names = list(classes) if classes is not None else default_classes()
    unknown = [n for n in names if n not in DEVICE_CLASSES and n != "host"]
    if unknown:
        raise BundleError(f"unknown device class {unknown[0]!r}: one of "
                          f"{', '.join(DEVICE_CLASSES)}")
    if sample < 1:
        raise BundleError(f"sample must be at least 1 sentence per set, got {sample}")
    model = Path(model)
    session = _host_session(model)
    feeds, references, counts = _sample_feeds(
        read_reference(reference), sample,
        {i.name: list(i.shape) for i in session.get_inputs()})
    host = host_class()
    outputs: dict[str, list[np.ndarray]] = {}
    names = [n for n in names if n in DEVICE_CLASSES]  # "host": added below as the anchor
    checks = {n: ClassCheck(n, DEVICE_CLASSES[n].title, "-", n in exact_on, False)
              for n in names}

    def timed(name: str, how: str, run: Callable[[], list[np.ndarray]]) -> None:
        begin = time.perf_counter()
        try:
            outputs[name] = run()
        except EmulationError as exc:
            checks[name].reason = str(exc)
            progress(f"device {name}: not verified ({exc})")
            return
        checks[name].how, checks[name].verified = how, True
        checks[name].seconds = round(time.perf_counter() - begin, 1)
        progress(f"device {name}: {how}, {len(feeds)} sentences in {checks[name].seconds} s")

    host_key = host if host is not None else "host"
    if host_key not in checks:  # the host anchors the agreement column, listed or not
        checks[host_key] = ClassCheck(host_key, DEVICE_CLASSES[host].title if host else
                                      "this machine (class not known)", "-",
                                      host_key in exact_on, False)
        names.append(host_key)
    timed(host_key, "native", lambda: [session.run(None, dict(f))[0] for f in feeds])
    pending = []
    for name in names:
        if name == host:
            continue
        if name == "wasm":
            reason = wasm_unavailable()
            if reason is None:
                pending.append((name, "onnxruntime-web in Node",
                                lambda: run_wasm(model, feeds)))
            else:
                checks[name].reason = reason
            continue
        reason = unavailable(name)
        if reason is None:
            emulator = EMULATED[name]
            pending.append((name, f"qemu -cpu {emulator.cpu}",
                            lambda emulator=emulator: [
                                r[0] for r in run_model(emulator.name, model, feeds)]))
        else:
            checks[name].reason = reason if name in EMULATED or name not in NOT_EMULATED \
                else NOT_EMULATED[name]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(lambda item: timed(*item), pending))

    anchor = outputs.get(host_key)
    for name, check in checks.items():
        if name not in outputs:
            continue
        start = 0
        for key, count in counts.items():
            cos = _cosines(outputs[name][start:start + count], references[start:start + count])
            check.figures[key] = {"mean": round(float(cos.mean()), 6),
                                  "worst": round(float(cos.min()), 6)}
            start += count
        if anchor is not None:
            check.agreement = round(float(_cosines(outputs[name], anchor).min()), 6)
    ran = list(outputs)
    worst, pair = None, []
    for i, a in enumerate(ran):
        for b in ran[i + 1:]:
            value = float(_cosines(outputs[a], outputs[b]).min())
            if worst is None or value < worst:
                worst, pair = round(value, 6), [a, b]
    return DeviceVerification(
        host=host, model=model.name, sample=counts,
        classes=[checks[n] for n in names],
        worst_agreement=worst, worst_pair=pair,
        seconds=round(time.perf_counter() - started, 1))
