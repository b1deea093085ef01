"""The comparison of compressed variants against the dense baseline: JSON, Markdown, HTML.

Pure Python (no torch, no numpy needed): a report can be rebuilt from its JSON and
re-rendered anywhere. Comparing bundles (:mod:`.bundles`, ``lrt-report``) also reads each
bundle's ``model.onnx`` with ``onnx`` for the size by component.
"""

from __future__ import annotations

from .bundles import BundleComparison, BundleSummary, load_bundle
from .comparison import ComparisonReport, VariantResult, format_table
from .components import size_by_component
from .html import to_html

__all__ = [
    "BundleComparison",
    "BundleSummary",
    "ComparisonReport",
    "VariantResult",
    "format_table",
    "load_bundle",
    "size_by_component",
    "to_html",
]
