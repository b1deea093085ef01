"""The comparison of compressed variants against the dense baseline: JSON, Markdown, HTML.

Pure Python (no torch, no numpy needed): a report can be rebuilt from its JSON and
re-rendered anywhere.
"""

from __future__ import annotations

from .comparison import ComparisonReport, VariantResult, format_table
from .html import to_html

__all__ = ["ComparisonReport", "VariantResult", "format_table", "to_html"]
