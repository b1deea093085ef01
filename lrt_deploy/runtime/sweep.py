"""lrt-bench's sweep engine: bundles timed against each other over batch, sequence and threads."""

from __future__ import annotations

import datetime
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lrt_deploy.errors import LrtDeployError

from .bundle import bundle_file, checked_file
from .limits import BYTES_PER_TOKENIZED_TOKEN, check_threads
from .memory import measure_peak_memory
from .session import Session, TensorSpec, _resolve_model_path
from .timing import NO_SPINNING, Schedule, Timings, runner, time_runs

__all__ = [
    "BENCH_FORMAT_VERSION",
    "BENCH_TEXT",
    "BenchInputError",
    "BenchResult",
    "BundleUnderTest",
    "benchmark_bundles",
    "bundle_feeds",
    "check_fits",
    "open_for_benchmark",
    "resolve_sequences",
    "synthetic_feeds",
]

logger = logging.getLogger(__name__)


#: ``format_version`` of the JSON that ``lrt-bench --json`` writes (schemas/bench.schema.json).
BENCH_FORMAT_VERSION = 1
# A sentence tokenized and repeated to fill the requested sequence length, so text bundles are
# timed on real token ids from their own tokenizer rather than on arbitrary numbers.
BENCH_TEXT = (
    "Low-rank factorization shrinks the weight matrices of a transformer so that the model "
    "fits on a phone, and the benchmark checks what that costs in latency on real tokens."
)
# Without a tokenizer, token ids are drawn from this range: valid rows of any BERT-like table.
_SYNTHETIC_ID_RANGE = (1, 100)
# Sequence length timed when none is asked for (and the bundles neither fix nor forbid it).
_DEFAULT_SEQUENCE = 128
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class BenchInputError(LrtDeployError):
    """A bundle or benchmark setting that cannot be benchmarked as asked."""


@dataclass
class BundleUnderTest:
    """A bundle opened for benchmarking: an ``InferenceSession`` with benchmark options.

    Attributes:
        label: Name shown in tables (the folder name unless given).
        path: Bundle folder or model file as given.
        model_path: The model file opened (``model.ort`` for mobile bundles).
        manifest: ``manifest.json`` (None for a bare model file).
        session: The ``onnxruntime.InferenceSession``.
        inputs: Graph inputs.
        load_s: Seconds to create the session (reading, optimising, allocating the model).
        providers: Providers the session really runs on.
        provider_message: One line on which providers were requested and which run.
        tokenizer_path: The bundle's ``tokenizer.json``, if any.
    """

    label: str
    path: Path
    model_path: Path
    manifest: dict[str, Any] | None
    session: ort.InferenceSession
    inputs: list[TensorSpec]
    load_s: float
    providers: list[str]
    provider_message: str
    tokenizer_path: Path | None = None
    checked: Session | None = None

    @property
    def text_limits(self) -> dict[str, int]:
        """The manifest's ``text`` section (``vocab_size``, ``max_sequence``), or {}."""
        return dict((self.manifest or {}).get("text") or {})

    @property
    def fixed_sequence(self) -> int | None:
        """The sequence length the model's inputs fix (axis 1), or None when it is free."""
        for spec in self.inputs:
            if len(spec.shape) >= 2 and isinstance(spec.shape[1], int) and spec.shape[1] > 0:
                return spec.shape[1]
        return None

    @property
    def model_bytes(self) -> int:
        """Size of the model file opened, plus external weights beside it."""
        size = self.model_path.stat().st_size
        if self.manifest is not None and self.model_path.suffix == ".onnx":
            data_path = bundle_file(self.path, self.manifest, "onnx_data")
            size += data_path.stat().st_size if data_path is not None else 0
        return size


def open_for_benchmark(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    label: str | None = None,
) -> BundleUnderTest:
    """Open a bundle (or model file) the way ``lrt-bench`` times it: ``threads`` intra-op
    threads, one inter-op thread, thread-pool spinning off (``timing.NO_SPINNING``).

    Args:
        path: Bundle folder with ``manifest.json``, or a ``.onnx`` / ``.ort`` file.
        threads: Intra-op threads; None keeps onnxruntime's default (one per core).
        providers: Providers in priority order; default: the manifest's, else CPU.
        label: Display name; default: the folder (or file) name.

    Raises:
        BundleError: If the path does not exist, is not a bundle, breaks the bundle contract
            or does not match its checksums.
    """
    folder = Path(path)
    check_threads(threads)
    # Checked (contract, files inside the bundle, SHA-256) before the clock starts.
    _resolve_model_path(folder, verify=True)
    began = time.perf_counter()
    opened = Session(folder, providers=providers, threads=threads, verify=False,
                     session_config=NO_SPINNING)
    load_s = time.perf_counter() - began
    manifest = opened.manifest
    # The tokenizer feeds the model too: inside the bundle and matching its checksum.
    tokenizer_path = checked_file(folder, manifest, "tokenizer") if manifest else None
    report = opened.provider_report()
    return BundleUnderTest(
        label=label or (folder.name if folder.is_dir() else folder.stem),
        path=folder,
        model_path=opened.model_path,
        manifest=manifest,
        session=opened.inference_session,
        inputs=opened.inputs,
        load_s=load_s,
        providers=list(opened.active_providers),
        provider_message=report["message"],
        tokenizer_path=tokenizer_path,
        checked=opened,
    )


def _axis_size(spec: TensorSpec, axis: int, batch: int, sequence: int) -> int:
    dim = spec.shape[axis]
    wanted = batch if axis == 0 else sequence
    if isinstance(dim, int) and dim > 0:
        if axis < 2 and dim != wanted:
            what = "batch" if axis == 0 else "sequence length"
            raise BenchInputError(
                f"input {spec.name!r} has a fixed {what} of {dim} (shape {spec.shape}); "
                f"benchmark it with --{'batch' if axis == 0 else 'sequence'} {dim}"
            )
        return dim
    return wanted


def synthetic_feeds(
    inputs: Sequence[TensorSpec],
    batch: int,
    sequence: int,
    *,
    tokenizer_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Build feeds of the requested batch and sequence length for a model's inputs.

    Text inputs (``input_ids``, ``attention_mask``, ``token_type_ids``) come from the
    bundle's tokenizer when given: a fixed English text repeated and truncated to exactly
    ``sequence`` tokens, no padding, so every position is real. Without a tokenizer, ids are
    drawn uniformly from 1..99 (valid in any BERT-like vocabulary), kept below ``vocab_size``
    when the bundle states a smaller vocabulary. Other inputs get seeded
    standard-normal floats or zeros; axis 0 is the batch, other dynamic axes take
    ``sequence``.

    Raises:
        BenchInputError: If the model fixes a batch or sequence size other than the one asked.
    """
    if batch < 1 or sequence < 1:
        raise BenchInputError(f"batch and sequence must be >= 1, got {batch} and {sequence}")
    rng = np.random.default_rng(seed)
    ids = None
    if tokenizer_path is not None and any(spec.name == "input_ids" for spec in inputs):
        from .text import TextEncoder

        encoder = TextEncoder(tokenizer_path, max_length=sequence, pad_to=sequence)
        repeats = 1 + sequence // 8
        ids = encoder.encode([" ".join([BENCH_TEXT] * repeats)] * batch)["input_ids"]
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = tuple(_axis_size(spec, axis, batch, sequence) for axis in range(len(spec.shape)))
        dtype = np.dtype(spec.dtype) if spec.dtype not in ("str", "bfloat16") else None
        if dtype is None:
            raise BenchInputError(f"input {spec.name!r} has dtype {spec.dtype}, not benchmarkable")
        if spec.name == "input_ids":
            if ids is not None and ids.shape == shape:
                feeds[spec.name] = ids.astype(dtype)
            else:
                feeds[spec.name] = rng.integers(*_id_range(vocab_size), size=shape).astype(dtype)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif spec.name == "token_type_ids" or dtype.kind in "iub":
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _id_range(vocab_size: int | None) -> tuple[int, int]:
    low, high = _SYNTHETIC_ID_RANGE
    if vocab_size is None or vocab_size >= high:
        return low, high
    # A tiny vocabulary: every id it has (id 0 too when it has only one or two).
    return (low if vocab_size > low + 1 else 0), max(vocab_size, 1)


def check_fits(bundle: BundleUnderTest, batch: int, sequence: int) -> None:
    """Refuse a batch x sequence whose feeds (tokenized, when the bundle has a tokenizer) and
    outputs alone exceed the memory left, before building anything.

    Raises:
        ResourceLimitError: With the bytes needed and available.
    """
    tokenized = bundle.tokenizer_path is not None and any(
        spec.name == "input_ids" for spec in bundle.inputs)
    bundle.checked.check_run_size(
        batch, sequence,
        extra_bytes=batch * sequence * BYTES_PER_TOKENIZED_TOKEN if tokenized else 0,
        fix=f"benchmark {bundle.label} with smaller --batch/--sequence values",
    )


def bundle_feeds(bundle: BundleUnderTest, batch: int, sequence: int) -> dict[str, np.ndarray]:
    """:func:`synthetic_feeds` for an opened bundle, checked once against its inputs and text
    limits (the timed runs then skip the checks), with a huge shape a one-line error."""
    check_fits(bundle, batch, sequence)
    try:
        feeds = synthetic_feeds(bundle.inputs, batch, sequence,
                                tokenizer_path=bundle.tokenizer_path,
                                vocab_size=bundle.text_limits.get("vocab_size"))
        return bundle.checked.prepare(feeds) if bundle.checked is not None else feeds
    except LrtDeployError:
        raise
    except (MemoryError, ValueError) as error:  # numpy: "array is too big" is a ValueError
        if isinstance(error, ValueError) and "too big" not in str(error):
            raise
        raise BenchInputError(
            f"batch {batch} x sequence {sequence} does not fit in memory for {bundle.label}: "
            "benchmark smaller --batch/--sequence values"
        ) from None


def resolve_sequences(
    bundles: Sequence[BundleUnderTest], sequences: Sequence[int] | None
) -> list[int]:
    """The sequence lengths to sweep: those asked for, each checked against every bundle's
    positions (``text.max_sequence``) and fixed input length; by default the bundles' own
    fixed length, else 128 capped at the fewest positions of any bundle."""
    fixed = {b.fixed_sequence for b in bundles} - {None}
    if sequences is None:
        if len(fixed) > 1:
            raise BenchInputError(
                f"the bundles fix different sequence lengths ({', '.join(map(str, sorted(fixed)))}"
                "): benchmark them separately, or pass --sequence"
            )
        limits = [b.text_limits.get("max_sequence") for b in bundles]
        default = min([_DEFAULT_SEQUENCE, *(m for m in limits if m)])
        sequences = [fixed.pop() if fixed else default]
    for bundle in bundles:
        most = bundle.text_limits.get("max_sequence")
        too_long = [s for s in sequences if most and s > most]
        if too_long:
            raise BenchInputError(
                f"--sequence {too_long[0]} is longer than {bundle.label} supports ({most} "
                f"positions): benchmark it with --sequence {most} or less"
            )
    return list(sequences)


@dataclass
class BenchResult:
    """What :func:`benchmark_bundles` measured; :meth:`to_dict` is the ``--json`` output.

    Attributes:
        bundles: Per bundle: label, path, model file and bytes, variant, providers, load
            seconds and first-run ms per thread count, and the memory probe.
        results: One entry per (threads, batch, sequence, bundle): latency figures, throughput
            and the ratio of its median to the first bundle's, with the spread of the
            per-round paired ratios.
        settings: The sweep and run counts.
        machine: Platform, CPU count, onnxruntime version, load average at the start.
    """

    bundles: list[dict[str, Any]]
    results: list[dict[str, Any]]
    settings: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready result (``format_version`` included)."""
        return {
            "format_version": BENCH_FORMAT_VERSION,
            "tool": "lrt-bench",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": self.machine,
            "settings": self.settings,
            "bundles": self.bundles,
            "results": self.results,
        }


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def _first_run(bundle: BundleUnderTest, feeds: dict[str, np.ndarray], batch: int,
               sequence: int) -> float:
    """The first run of a fresh session, timed (what an app's first request costs); a run that
    fails (out of memory, inputs the model refuses) is a one-line error before any timing."""
    try:
        return time_runs([runner(bundle.session, feeds)], Schedule(runs=1, warmup=0)
                         ).stats().median_ms
    except MemoryError:
        reason = "out of memory"
    except _ORT_RUN_ERRORS as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if "memory" in reason or "alloc" in reason.lower():
        fix = "benchmark smaller --batch/--sequence values"
    else:
        fix = ("its manifest does not state the limits of its inputs (text.vocab_size, "
               "text.max_sequence): re-export the bundle, or benchmark other --sequence values")
    raise BenchInputError(
        f"{bundle.label} cannot run batch {batch} x sequence {sequence} ({reason}); {fix}"
    )


_ORT_RUN_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("Fail", "RuntimeException", "InvalidArgument")
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)
)


@dataclass(frozen=True)
class _Sweep:
    """The settings of one :func:`benchmark_bundles` call, checked before anything opens."""

    paths: list[str | os.PathLike[str]]
    names: list[str]
    batches: list[int]
    threads: list[int | None]
    schedule: Schedule
    report: Callable[[str], None]


def _check_sweep(paths: Sequence[str | os.PathLike[str]], batches: Sequence[int],
                 sequences: Sequence[int] | None, threads: Sequence[int | None], warmup: int,
                 runs: int, labels: Sequence[str] | None) -> None:
    if not paths:
        raise BenchInputError("give at least one bundle")
    if runs < 1 or warmup < 0:
        raise BenchInputError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if labels is not None and len(labels) != len(paths):
        raise BenchInputError(f"got {len(labels)} labels for {len(paths)} bundles")
    for value in [*batches, *(sequences or ())]:
        if value < 1:
            raise BenchInputError(f"batch and sequence sizes must be >= 1, got {value}")
    for thread_count in threads:  # every setting before the first one runs
        check_threads(thread_count)


def benchmark_bundles(
    paths: Sequence[str | os.PathLike[str]],
    *,
    batches: Sequence[int] = (1,),
    sequences: Sequence[int] | None = None,
    threads: Sequence[int | None] = (None,),
    warmup: int = 5,
    runs: int = 30,
    max_seconds: float | None = None,
    labels: Sequence[str] | None = None,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Benchmark bundles against each other over a sweep of shapes and thread counts.

    Per thread count every bundle is opened (spinning off); per (batch, sequence) its first
    run is timed, then all are timed run by run by :func:`~.timing.time_runs`. Ratios to the
    first bundle are of the medians, with the 10th..90th percentile of the per-round ratios.
    Peak memory: a fresh process per bundle at the largest batch x sequence.

    Args:
        paths: Bundle folders (or model files); the first is the reference for ratios.
        batches: Batch sizes to sweep.
        sequences: Sequence lengths to sweep; None: the length the bundles fix, else 128 or
            the fewest positions a bundle has.
        threads: Intra-op thread counts to sweep; None keeps onnxruntime's default.
        warmup: Untimed runs per bundle and configuration, the timed first run included.
        runs: Timed rounds per configuration.
        max_seconds: Stop a configuration's rounds after this long (at least 3 rounds).
        labels: Display names, one per path; default: folder names.
        memory: Run the per-bundle memory probe.
        progress: Called with a one-line status now and then (e.g. print to stderr).

    Raises:
        BenchInputError: On a missing bundle, bad sweep values or a shape a bundle fixes.
    """
    _check_sweep(paths, batches, sequences, threads, warmup, runs, labels)
    sweep = _Sweep(list(paths), _unique_labels(paths, labels), list(batches), list(threads),
                   Schedule(runs=runs, warmup=max(warmup - 1, 0), max_seconds=max_seconds,
                            min_rounds=3),
                   progress or (lambda _: None))
    bundle_info: list[dict[str, Any]] = [{"label": name} for name in sweep.names]
    results: list[dict[str, Any]] = []
    configs: list[tuple[int, int]] | None = None
    for thread_count in sweep.threads:
        opened = [open_for_benchmark(path, threads=thread_count, label=name)
                  for path, name in zip(sweep.paths, sweep.names, strict=True)]
        if configs is None:  # known once the bundles are open (their fixed shapes, positions)
            sequences = resolve_sequences(opened, sequences)
            configs = [(b, s) for b in sweep.batches for s in sequences]
            for bundle in opened:  # every shape before the first one is built or timed
                for batch, sequence in configs:
                    check_fits(bundle, batch, sequence)
        thread_key = str(thread_count or "default")
        for info, bundle in zip(bundle_info, opened, strict=True):
            _describe(info, bundle)
            info.setdefault("load_s", {})[thread_key] = bundle.load_s
        for batch, sequence in configs:
            step = len(results) // len(opened) + 1
            prefix = (f"[{step}/{len(sweep.threads) * len(configs)}] threads {thread_key}, "
                      f"batch {batch}, sequence {sequence}")
            results += _time_setting(sweep, opened, bundle_info, thread_count, batch, sequence,
                                     prefix)
        del opened  # released before the next thread setting opens its own sessions
    if memory:
        _probe_memory(sweep, bundle_info, configs)
    settings = {
        "batches": list(batches),
        "sequences": list(sequences),
        "threads": list(threads),
        "warmup": warmup,
        "runs": runs,
        "max_seconds": max_seconds,
        "interleaved": True,
        "intra_op_spinning": False,
        "reference": sweep.names[0],
    }
    return BenchResult(bundle_info, results, settings, _machine())


def _time_setting(sweep: _Sweep, opened: list[BundleUnderTest],
                  bundle_info: list[dict[str, Any]], thread_count: int | None, batch: int,
                  sequence: int, prefix: str) -> list[dict[str, Any]]:
    """The result rows of one (threads, batch, sequence): first runs, then the rounds."""
    feeds = [bundle_feeds(b, batch, sequence) for b in opened]
    thread_key = str(thread_count or "default")
    for info, bundle, feed in zip(bundle_info, opened, feeds, strict=True):
        sweep.report(f"{prefix}: warming up {bundle.label}")
        first = _first_run(bundle, feed, batch, sequence)
        info.setdefault("first_run_ms", {}).setdefault(thread_key, first)

    def rounds_done(done: int) -> None:
        if done % 10 == 0:
            sweep.report(f"{prefix}: {done}/{sweep.schedule.runs} rounds")

    timings = time_runs([runner(b.session, f) for b, f in zip(opened, feeds, strict=True)],
                        sweep.schedule, progress=rounds_done)
    if timings.rounds < timings.planned_rounds:
        sweep.report(f"{prefix}: stopped after {timings.rounds} rounds "
                     f"({timings.seconds:.0f} s)")
    return [_result_row(timings, index, bundle.label, thread_count, batch, sequence)
            for index, bundle in enumerate(opened)]


def _result_row(timings: Timings, index: int, label: str, thread_count: int | None,
                batch: int, sequence: int) -> dict[str, Any]:
    """One ``results`` entry of the ``--json`` output (schemas/bench.schema.json)."""
    stats = timings.stats(index)
    paired = timings.paired_ratios(index)
    return {
        "bundle": label,
        "threads": thread_count,
        "batch": batch,
        "sequence": sequence,
        "median_ms": stats.median_ms,
        "p90_ms": stats.p90_ms,
        "p99_ms": stats.p99_ms,
        "mean_ms": stats.mean_ms,
        "min_ms": stats.min_ms,
        "max_ms": stats.max_ms,
        "runs": stats.runs,
        "throughput_per_s": stats.throughput(batch),
        "ratio_vs_first": stats.median_ms / timings.stats(0).median_ms,
        "ratio_p10": float(np.percentile(paired, 10)),
        "ratio_p90": float(np.percentile(paired, 90)),
    }


def _probe_memory(sweep: _Sweep, bundle_info: list[dict[str, Any]],
                  configs: list[tuple[int, int]]) -> None:
    batch, sequence = max(configs, key=lambda c: c[0] * c[1])
    thread_count = max((t for t in sweep.threads if t is not None), default=None)
    for info, path in zip(bundle_info, sweep.paths, strict=True):
        sweep.report(f"memory: {info['label']} in a fresh process (batch {batch}, "
                     f"sequence {sequence})")
        info["memory"] = measure_peak_memory(path, batch, sequence, threads=thread_count)


def _unique_labels(
    paths: Sequence[str | os.PathLike[str]], labels: Sequence[str] | None
) -> list[str]:
    names = list(labels) if labels is not None else [
        Path(p).name if Path(p).is_dir() else Path(p).stem for p in paths
    ]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def _describe(info: dict[str, Any], bundle: BundleUnderTest) -> None:
    manifest = bundle.manifest or {}
    info.update(
        path=str(bundle.path),
        model_file=bundle.model_path.name,
        model_bytes=bundle.model_bytes,
        variant=manifest.get("variant"),
        target=(manifest.get("target") or {}).get("name"),
        fidelity=manifest.get("fidelity") or {},
        providers=bundle.providers,
        provider_message=bundle.provider_message,
        inputs="tokenizer" if bundle.tokenizer_path else "synthetic",
    )
