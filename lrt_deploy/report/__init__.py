"""Reports: the comparison of a run's variants (data, renderers, writer) and of bundles.

:mod:`.model` holds the typed data; :mod:`.render` turns it into Markdown and HTML;
:mod:`.writer` writes the files; :mod:`.summary` builds a run's report from its typed results;
:mod:`.bundles` compares bundles (``lrt-report``). Pure Python: no torch, no numpy needed.
"""

from __future__ import annotations

from .bundles import BundleComparison, BundleSummary, load_bundle
from .components import size_by_component
from .model import ComparisonReport, ReportSettings, VariantResult
from .render.html import to_html
from .render.markdown import format_table, to_markdown
from .writer import write_json, write_report

__all__ = [
    "BundleComparison",
    "BundleSummary",
    "ComparisonReport",
    "ReportSettings",
    "VariantResult",
    "format_table",
    "load_bundle",
    "size_by_component",
    "to_html",
    "to_markdown",
    "write_json",
    "write_report",
]
