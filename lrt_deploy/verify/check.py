"""Run a bundle on every device class reachable here and score it against the dense model.

Each class runs sentences of ``verification.npz`` one per run, with onnxruntime's default
session options, one thread and the bundle's session config entries. Standard library, numpy and
onnxruntime only: ``lrt-verify`` runs without torch.
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
#: Sentences of each held-out set run on every class, one per run.
SAMPLE_SENTENCES = 8
#: Sentences of each held-out set stored in ``verification.npz``: the most a run can sample.
REFERENCE_SENTENCES = 64
#: The held-out sets, by key: the shipped files they come from.
SETS = {"heldout": "heldout.txt", "domain": "heldout_domain.txt"}

ProgressFn = Callable[[str], None]
#: Environment variable limiting the classes run when none are named: a comma list, or
#: ``host`` for this machine's class alone.
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
    """Write ``verification.npz``: per set, ``<set>/<input>`` int64 rows (``attention_mask``
    among them) and ``<set>/reference``, the dense float32 outputs."""
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
    """One device class: how it ran (or why not), its cosines to the dense model per set
    (``mean``, ``worst``) and its worst per-sentence agreement with the host."""

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
        """Classes that ran with a mean cosine under ``floor`` on a set; with ``strict``, also
        those that did not run and that the weight check does not prove exact."""
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
    """One feed and dense reference row per sentence, trimmed to its length unless the graph
    fixes the sequence axis, and the count per set."""
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



def _host_session(model: Path, session_config: Mapping[str, str]) -> Any:
    """The model in this host's onnxruntime: default options, one thread, the bundle's entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in session_config.items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BundleError(f"cannot open {model.name}: {reason}; re-export the bundle") from None


def _checked_classes(classes: Sequence[str] | None, sample: int) -> list[str]:
    """The class names to list (``host`` allowed); BundleError for an unknown one or no sample."""
    names = list(classes) if classes is not None else default_classes()
    unknown = [n for n in names if n not in DEVICE_CLASSES and n != "host"]
    if unknown:
        raise BundleError(f"unknown device class {unknown[0]!r}: one of "
                          f"{', '.join(DEVICE_CLASSES)}")
    if sample < 1:
        raise BundleError(f"sample must be at least 1 sentence per set, got {sample}")
    return names


def _class_checks(names: list[str], host: str | None, exact_on: Sequence[str]
                  ) -> tuple[list[str], dict[str, ClassCheck]]:
    """An empty check per known class, plus this host's: it anchors the agreement column."""
    names = [n for n in names if n in DEVICE_CLASSES]
    checks = {n: ClassCheck(n, DEVICE_CLASSES[n].title, "-", n in exact_on, False)
              for n in names}
    host_key = host if host is not None else "host"
    if host_key not in checks:
        title = DEVICE_CLASSES[host].title if host else "this machine (class not known)"
        checks[host_key] = ClassCheck(host_key, title, "-", host_key in exact_on, False)
        names.append(host_key)
    return names, checks


@dataclass
class _Runs:
    """Each class's outputs, filled in as its run finishes; a run that cannot start says why."""

    checks: dict[str, ClassCheck]
    sentences: int
    progress: ProgressFn
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def run(self, name: str, how: str, run: Callable[[], list[np.ndarray]]) -> None:
        check = self.checks[name]
        begin = time.perf_counter()
        try:
            self.outputs[name] = run()
        except EmulationError as exc:
            check.reason = str(exc)
            self.progress(f"device {name}: not verified ({exc})")
            return
        check.how, check.verified = how, True
        check.seconds = round(time.perf_counter() - begin, 1)
        self.progress(f"device {name}: {how}, {self.sentences} sentences in {check.seconds} s")


def _other_runs(names: list[str], host: str, checks: dict[str, ClassCheck], model: Path,
                feeds: list[dict[str, np.ndarray]], session_config: Mapping[str, str]
                ) -> list[tuple[str, str, Callable[[], list[np.ndarray]]]]:
    """``(class, how, run)`` for each class other than the host's that can run here; the others'
    checks get the reason they cannot."""
    pending: list[tuple[str, str, Callable[[], list[np.ndarray]]]] = []
    for name in names:
        if name == host:
            continue
        if name == "wasm":
            reason = wasm_unavailable()
            if reason is None and session_config:
                # wasm-bench.js opens the model with onnxruntime-web's defaults only.
                reason = ("onnxruntime-web is run without session config entries, and the "
                          f"bundle sets {', '.join(session_config)}")
            if reason is None:
                pending.append((name, "onnxruntime-web in Node", lambda: run_wasm(model, feeds)))
            else:
                checks[name].reason = reason
            continue
        reason = unavailable(name)
        if reason is None:
            emulator = EMULATED[name]
            pending.append((name, f"qemu -cpu {emulator.cpu}",
                            lambda emulator=emulator: [
                                r[0] for r in run_model(emulator.name, model, feeds,
                                                        session_config=session_config)]))
        elif name in EMULATED or name not in NOT_EMULATED:
            checks[name].reason = reason
        else:
            checks[name].reason = NOT_EMULATED[name]
    return pending


def _score(checks: dict[str, ClassCheck], outputs: Mapping[str, list[np.ndarray]],
           references: list[np.ndarray], counts: Mapping[str, int], anchor: str) -> None:
    """Fill each run class's figures per set and its worst agreement with the ``anchor``'s."""
    host_outputs = outputs.get(anchor)
    for name, check in checks.items():
        if name not in outputs:
            continue
        start = 0
        for key, count in counts.items():
            cos = _cosines(outputs[name][start:start + count], references[start:start + count])
            check.figures[key] = {"mean": round(float(cos.mean()), 6),
                                  "worst": round(float(cos.min()), 6)}
            start += count
        if host_outputs is not None:
            check.agreement = round(float(_cosines(outputs[name], host_outputs).min()), 6)


def _worst_pair(outputs: Mapping[str, list[np.ndarray]]) -> tuple[float | None, list[str]]:
    """The lowest per-sentence cosine between any two classes that ran, and that pair."""
    ran = list(outputs)
    worst, pair = None, []
    for i, a in enumerate(ran):
        for b in ran[i + 1:]:
            value = float(_cosines(outputs[a], outputs[b]).min())
            if worst is None or value < worst:
                worst, pair = round(value, 6), [a, b]
    return worst, pair


def verify_model(
    model: Path,
    reference: Path,
    exact_on: Sequence[str],
    *,
    classes: Sequence[str] | None = None,
    sample: int = SAMPLE_SENTENCES,
    jobs: int = 2,
    session_config: Mapping[str, str] | None = None,
    progress: ProgressFn = lambda _line: None,
) -> DeviceVerification:
    """Run ``model`` on ``sample`` sentences per set of ``reference`` on every class in
    ``classes`` that can run here (``jobs`` emulated at a time) and score each.

    Args:
        exact_on: The classes the weight check proves exact (``exact_classes``).
        classes: Device classes to list (default :func:`default_classes`); ``host`` is this
            machine's.
        session_config: The bundle's ``devices.session_config``, applied on every class as
            :class:`lrt_deploy.runtime.Session` applies it.
    """
    started = time.perf_counter()
    names = _checked_classes(classes, sample)
    model = Path(model)
    config = dict(session_config or {})
    session = _host_session(model, config)
    feeds, references, counts = _sample_feeds(
        read_reference(reference), sample,
        {i.name: list(i.shape) for i in session.get_inputs()})
    host = host_class()
    names, checks = _class_checks(names, host, exact_on)
    runs = _Runs(checks, len(feeds), progress)
    host_key = host if host is not None else "host"
    runs.run(host_key, "native", lambda: [session.run(None, dict(f))[0] for f in feeds])
    pending = _other_runs(names, host_key, checks, model, feeds, config)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(lambda item: runs.run(*item), pending))
    _score(checks, runs.outputs, references, counts, host_key)
    worst, pair = _worst_pair(runs.outputs)
    return DeviceVerification(
        host=host, model=model.name, sample=counts, classes=[checks[n] for n in names],
        worst_agreement=worst, worst_pair=pair,
        seconds=round(time.perf_counter() - started, 1))
