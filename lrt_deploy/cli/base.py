"""What every lrt-* command shares: exit codes, the parser, one-line errors, the table printer."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = [
    "EXIT_FLOOR_MISSED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Parser",
    "markdown_table",
    "print_error",
]

EXIT_OK = 0
#: A bad flag, a missing or broken input, anything the user must change before a rerun.
EXIT_USAGE = 2
#: The command ran, but a figure is below ``--fidelity-floor`` (CI gates on it).
EXIT_FLOOR_MISSED = 3
#: Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit with
    :data:`EXIT_USAGE`."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def print_error(prog: str, message: object, code: int = EXIT_USAGE) -> int:
    """Print ``PROG: error: MESSAGE`` as one line on stderr; return ``code``."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded to their widest cell: the first left-aligned, the
    others right-aligned (numbers)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])
