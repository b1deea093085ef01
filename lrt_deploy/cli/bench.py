"""``lrt-bench``: flags to :func:`~lrt_deploy.runtime.sweep.benchmark_bundles`, its tables out."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lrt_deploy.cli.base import EXIT_INTERRUPTED, EXIT_OK, Parser, markdown_table, print_error
from lrt_deploy.errors import LrtDeployError
from lrt_deploy.runtime.files import write_atomic
from lrt_deploy.runtime.limits import check_threads
from lrt_deploy.runtime.sweep import BenchResult, benchmark_bundles

__all__ = ["build_parser", "format_tables", "main"]

_PROG = "lrt-bench"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 1,8, got {text!r}"
        ) from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 1 such as 1,8, got {text!r}")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    """Return the ``lrt-bench`` argument parser."""
    parser = Parser(
        prog=_PROG,
        description="Benchmark exported bundles: load time, first run, latency percentiles, "
        "throughput and peak memory over a sweep of batch, sequence length and threads. "
        "Bundles run interleaved, run by run, so machine drift cancels in the ratios to the "
        "first bundle.",
    )
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE",
                        help="bundle folders (or .onnx/.ort files); the first is the reference")
    parser.add_argument("--batch", type=_int_list, default=[1], metavar="N[,N...]",
                        help="batch sizes to sweep (default 1)")
    parser.add_argument("--sequence", type=_int_list, default=None, metavar="N[,N...]",
                        help="sequence lengths to sweep (default: the length the bundles fix, "
                        "else 128, or fewer when a bundle has fewer positions)")
    parser.add_argument("--threads", type=_int_list, default=None, metavar="N[,N...]",
                        help="intra-op thread counts to sweep (default: onnxruntime's, one per "
                        "core)")
    parser.add_argument("--runs", type=int, default=30, help="timed rounds per setting "
                        "(default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per bundle and "
                        "setting (default 5)")
    parser.add_argument("--max-seconds", type=float, default=None, metavar="S",
                        help="stop a setting's rounds after S seconds (at least 3 rounds)")
    parser.add_argument("--label", action="append", default=None, metavar="NAME",
                        help="display name per bundle, in order (default: folder names)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the per-bundle peak-memory probe (one fresh process each)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write every figure as JSON (schemas/bench.schema.json)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return parser


def _number(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _difference(value: float | None, minus: float | None) -> float | None:
    return None if value is None or minus is None else value - minus


def format_tables(result: BenchResult | dict[str, Any]) -> str:
    """Render a benchmark result (or its JSON dict) as two Markdown tables.

    The first lists each bundle (size, load time, first run, peak memory), the second every
    (threads, batch, sequence, bundle) with latency percentiles, throughput and the ratio of
    its median to the first bundle's, with the 10th..90th percentile of the per-round ratios.
    """
    data = result.to_dict() if isinstance(result, BenchResult) else result
    bundle_rows = []
    for info in data["bundles"]:
        memory = info.get("memory") or {}
        load = info.get("load_s") or {}
        first = info.get("first_run_ms") or {}
        key = next(iter(load), None)
        bundle_rows.append([
            info["label"],
            info.get("model_file", "-"),
            _number(info.get("model_bytes", 0) / 1e6, 2),
            _number(load.get(key), 3),
            _number(first.get(key), 1),
            _number(_difference(memory.get("after_load_rss_mb"), memory.get("baseline_rss_mb")),
                    0),
            _number(memory.get("peak_rss_mb"), 0),
            _number(memory.get("model_mb"), 0),
        ])
    bundles = markdown_table(
        ["Bundle", "File", "Size (MB)", "Load (s)", "First run (ms)", "RSS after load (MB)",
         "Peak RSS (MB)", "Run RSS (MB)"],
        bundle_rows,
    )
    rows = []
    for entry in data["results"]:
        ratio = entry.get("ratio_vs_first")
        spread = f"{ratio:.2f}x ({entry['ratio_p10']:.2f}-{entry['ratio_p90']:.2f})"
        rows.append([
            entry["bundle"],
            str(entry["threads"] or "default"),
            str(entry["batch"]),
            str(entry["sequence"]),
            _number(entry["median_ms"], 2),
            _number(entry["p90_ms"], 2),
            _number(entry["p99_ms"], 2),
            _number(entry["throughput_per_s"], 1),
            spread,
        ])
    latency = markdown_table(
        ["Bundle", "Threads", "Batch", "Seq", "Median (ms)", "p90 (ms)", "p99 (ms)",
         "Samples/s", "vs first (p10-p90)"],
        rows,
    )
    settings = data["settings"]
    notes = [
        f"{settings['runs']} interleaved rounds per setting after {settings['warmup']} warm-up "
        "runs; intra-op spinning off; ratios are medians vs the first bundle, the spread is "
        "the 10th-90th percentile of per-round ratios.",
        "Load and first run: the first thread setting. Memory: a fresh process per bundle; RSS "
        "after load: what opening the bundle added to the resident set; Peak RSS: the whole "
        "process's high-water mark (Python and onnxruntime included) after running the largest "
        "batch x sequence; Run RSS: peak minus the RSS before the bundle was opened (weights "
        "plus activations at that shape).",
    ]
    machine = data.get("machine") or {}
    if machine:
        notes.append(
            f"Machine: {machine.get('platform')}, {machine.get('cpu_count')} CPUs, onnxruntime "
            f"{machine.get('onnxruntime')}, load average {machine.get('load_average_1min')} at "
            "the start."
        )
    return "\n\n".join([bundles, latency, "\n".join(notes)]) + "\n"


def _progress(quiet: bool) -> Callable[[str], None] | None:
    if quiet:
        return None
    interactive = sys.stderr.isatty()

    def show(message: str) -> None:
        # On a terminal the line is rewritten in place; in a log every update is kept.
        if interactive:
            sys.stderr.write(f"\r\033[K{message}")
        else:
            sys.stderr.write(message + "\n")
        sys.stderr.flush()

    return show


def _json_problem(path: Path) -> str | None:
    """Why ``--json PATH`` cannot be written (checked before the benchmark runs), or None."""
    if path.is_dir():
        return f"--json {path} is a folder; give a file name such as bench.json"
    if not path.parent.is_dir():
        return f"--json {path}: folder {path.parent} does not exist; create it first"
    try:  # the real test (permissions, read-only mounts, /proc): create a file there
        handle, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return (f"--json {path} cannot be written ({error.strerror or type(error).__name__}); "
                "choose another file")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lrt-bench``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.runs < 1 or args.warmup < 0:
        return print_error(_PROG, "need --runs >= 1 and --warmup >= 0")
    missing = [path for path in args.bundles if not Path(path).exists()]
    if missing:
        return print_error(_PROG, f"{missing[0]} does not exist; pass a bundle folder written "
                           "by lrt-export")
    try:  # the machine's limits, before any bundle is opened
        for thread_count in args.threads or ():
            check_threads(thread_count, name="--threads")
    except LrtDeployError as error:
        return print_error(_PROG, error)
    problem = _json_problem(args.json) if args.json is not None else None
    if problem:
        return print_error(_PROG, problem)
    progress = _progress(args.quiet)
    try:
        result = benchmark_bundles(
            args.bundles,
            batches=args.batch,
            sequences=args.sequence,
            threads=args.threads or [None],
            warmup=args.warmup,
            runs=args.runs,
            max_seconds=args.max_seconds,
            labels=args.label,
            memory=not args.no_memory,
            progress=progress,
        )
    except KeyboardInterrupt:
        print(f"\n{_PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LrtDeployError as error:
        if progress is not None and sys.stderr.isatty():
            sys.stderr.write("\n")
        return print_error(_PROG, error)
    if progress is not None and sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    if args.json is not None:
        try:
            write_atomic(args.json, json.dumps(result.to_dict(), indent=2, allow_nan=False))
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            return print_error(_PROG, f"cannot write {args.json}: {reason}; choose another "
                               "--json")
    print(format_tables(result), end="")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
