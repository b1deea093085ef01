"""``lrt-report``: rebuild a bundle's report, or compare several bundles in one page.

``lrt-report BUNDLE -o report.html`` re-renders the bundle's ``report.json`` (``.md`` or
``.html`` by the output's suffix). ``lrt-report A B C -o compare.html [--bench bench.json]``
compares bundles: table, size by component, latency vs sequence length (from ``lrt-bench
--json``), fidelity vs size with the Pareto front. Only parses arguments and calls
:class:`~lrt_deploy.report.bundles.BundleComparison` and
:class:`~lrt_deploy.report.model.ComparisonReport`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lrt_deploy.cli.base import EXIT_OK, Parser, print_error
from lrt_deploy.errors import LrtDeployError
from lrt_deploy.report.bundles import BundleComparison, ReportInputError, read_report
from lrt_deploy.report.render.markdown import to_markdown
from lrt_deploy.runtime.files import write_atomic as _write_atomic

__all__ = ["build_parser", "main", "rebuild_report"]

_PROG = "lrt-report"
_SUFFIXES = (".html", ".htm", ".md")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``lrt-report`` argument parser."""
    parser = Parser(
        prog=_PROG,
        description="Rebuild a bundle's report from its report.json, or compare several "
        "bundles: size by component, latency vs sequence length, fidelity vs size with the "
        "Pareto front. The HTML is self-contained (inline SVG, no network).",
    )
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                        help="report.html or report.md (format from the suffix)")
    parser.add_argument("--bench", type=Path, default=None, metavar="JSON",
                        help="lrt-bench --json output for these bundles (latency charts)")
    parser.add_argument("--label", action="append", default=None, metavar="NAME",
                        help="display name per bundle, in order (default: folder names)")
    parser.add_argument("--metric", default="mean_cosine",
                        help="fidelity metric for the Pareto chart (default mean_cosine)")
    parser.add_argument("--compare", action="store_true",
                        help="comparison page even for one bundle")
    return parser


def rebuild_report(bundle: str | Path, output: str | Path) -> Path:
    """Re-render a bundle's ``report.json`` as Markdown or HTML.

    The report is the file the manifest names under ``files.report``, opened through the
    runtime's checked resolver: a name outside the bundle is refused, never followed.

    Args:
        bundle: Bundle folder.
        output: Destination; ``.md`` (any case) gives Markdown, anything else HTML.

    Raises:
        ReportInputError: If the bundle has no readable ``report.json`` or ``output`` cannot
            be written.
        BundleError: If the manifest is unreadable or names a file outside the bundle.
    """
    from lrt_deploy.runtime.bundle import MANIFEST_NAME, checked_file, read_manifest

    folder = Path(bundle)
    if not (folder / MANIFEST_NAME).is_file():
        raise ReportInputError(
            f"{folder} is not a bundle (no manifest.json); pass a bundle written by lrt-export"
        )
    path = checked_file(folder, read_manifest(folder), "report")
    if path is None:
        raise ReportInputError(f"{folder} has no report.json; pass a bundle written by lrt-export")
    report = read_report(path)
    out = Path(output)
    if _is_markdown(out):
        return write_output(out, to_markdown(report))
    from lrt_deploy.report.render.html import to_html

    return write_output(out, to_html(report))


def _is_markdown(path: Path) -> bool:
    return path.suffix.lower() == ".md"


def write_output(path: Path, text: str) -> Path:
    """Write the page atomically; a path that cannot be written is one
    :class:`ReportInputError` line, and nothing (no temporary file) is left behind."""
    if path.is_dir():
        raise ReportInputError(f"{path} is a folder; give -o a file name such as report.html")
    try:
        return _write_atomic(path, text)
    except OSError as error:
        raise ReportInputError(
            f"cannot write {path}: {error.strerror or type(error).__name__}; choose another -o"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lrt-report``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    output: Path = args.output
    try:
        if output.suffix.lower() not in _SUFFIXES:
            raise ReportInputError(
                f"cannot tell the format of {output}; name it .html or .md"
            )
        missing = [path for path in args.bundles if not Path(path).is_dir()]
        if missing:
            raise ReportInputError(
                f"{missing[0]} is not a folder; pass bundle folders written by lrt-export"
            )
        if not output.parent.is_dir():
            raise ReportInputError(f"{output.parent} does not exist; create it first")
        if output.is_dir():
            raise ReportInputError(f"{output} is a folder; give -o a file name such as "
                                   "report.html")
        if len(args.bundles) == 1 and args.bench is None and not args.compare:
            written = rebuild_report(args.bundles[0], output)
        else:
            comparison = BundleComparison.from_paths(
                args.bundles, labels=args.label, bench=args.bench, metric=args.metric
            )
            text = comparison.to_markdown() if _is_markdown(output) else comparison.to_html()
            written = write_output(output, text)
    except LrtDeployError as error:
        return print_error(_PROG, error)
    print(f"wrote {written}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
