"""Writes a comparison report's files (``report.json``, ``.md``, ``.html``), each atomically."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lrt_deploy.runtime.files import write_atomic

from .render.html import to_html
from .render.markdown import to_markdown

if TYPE_CHECKING:
    from .model import ComparisonReport

__all__ = ["write_json", "write_report"]

logger = logging.getLogger(__name__)


def write_json(report: ComparisonReport, path: str | os.PathLike[str]) -> Path:
    """Write ``report.to_dict()`` as indented JSON (no NaN) to ``path``; return the path."""
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False)
    return write_atomic(Path(path), text)


def write_report(
    report: ComparisonReport, folder: str | os.PathLike[str], *, html: bool = True
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (``html``) ``report.html`` into ``folder``,
    created if needed; return format (``json``, ``markdown``, ``html``) -> path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "json": write_json(report, out / "report.json"),
        "markdown": write_atomic(out / "report.md", to_markdown(report)),
    }
    if html:
        written["html"] = write_atomic(out / "report.html", to_html(report))
    logger.info("wrote report to %s", out)
    return written
