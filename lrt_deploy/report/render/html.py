"""A comparison report as one self-contained HTML page (inline SVG charts, no scripts)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

from .svg import bar_chart_svg
from .tables import (
    device_table,
    exactness_line,
    format_value,
    layer_table,
    measured_on_line,
    op_counts_text,
    settings_line,
    variant_table,
)

if TYPE_CHECKING:
    from lrt_deploy.report.model import ComparisonReport

__all__ = ["STYLE", "html_page", "html_table", "to_html"]

#: The stylesheet of every page this package writes.
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 80rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; white-space: nowrap; }
.fallback { background: #fff4e5; border-left: 4px solid #dd6b20; padding: 0.5rem 1rem; }
.charts { display: flex; flex-wrap: wrap; gap: 2rem; }
"""


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table with every cell escaped."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, body: Sequence[str]) -> str:
    """A complete HTML document: ``title`` escaped, ``body`` parts as given."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )


def to_html(report: ComparisonReport) -> str:
    """The report as one HTML page with size and latency charts."""
    body = [
        f"<h1>Compression report: {escape(report.model)}</h1>",
        f"<p>{escape(settings_line(report))}</p>",
    ]
    measured_on = measured_on_line(report)
    if measured_on:
        body.append(f"<p>{escape(measured_on)}</p>")
    fallback = report.fallback_line()
    if fallback:
        body.append(
            f'<p class="fallback"><strong>Provider fallback:</strong> {escape(fallback)}</p>'
        )
    settings = report.settings
    if settings.fidelity_inputs:
        body.append(f"<p>Fidelity measured on: {escape(str(settings.fidelity_inputs))}</p>")
    if settings.baseline:
        body.append(f"<p>Baseline: {escape(str(settings.baseline))}</p>")
    if settings.latency:
        body.append(f"<p>Latency timed {escape(str(settings.latency))}</p>")
    body += [html_table(*variant_table(report)), _charts(report)]
    return html_page(f"{report.model} compression report", body + _sections(report))


def _charts(report: ComparisonReport) -> str:
    """Size and median latency per variant, the baseline's bar grey."""
    labels = [variant.name for variant in report.variants]
    baseline = next((i for i, v in enumerate(report.variants) if v.is_baseline), None)
    charts = [
        bar_chart_svg("Model size", labels, [v.size_mb for v in report.variants],
                      unit=" MB", highlight=baseline),
        bar_chart_svg("Median latency", labels, [v.median_ms for v in report.variants],
                      unit=" ms", highlight=baseline),
    ]
    return f'<div class="charts">{"".join(charts)}</div>'


def _sections(report: ComparisonReport) -> list[str]:
    """Notes, device classes, quantisation, graph optimisation and layers, as HTML parts."""
    body = []
    notes = [f"{v.name}: {note}" for v in report.variants for note in v.notes]
    notes += list(report.provider_messages)
    if notes:
        items = "".join(f"<li>{escape(note)}</li>" for note in notes)
        body.append(f"<h2>Notes</h2><ul>{items}</ul>")
    if report.devices:
        body += ["<h2>Device classes</h2>", f"<p>{escape(exactness_line(report.devices))}</p>"]
        table = device_table(report.devices)
        if table is not None:
            body += [html_table(*table[:2]), f"<p>{escape(table[2])}</p>"]
    if report.quantisation:
        rows = [[str(key), format_value(value)] for key, value in report.quantisation.items()]
        body += ["<h2>Quantisation</h2>", html_table(["Setting", "Value"], rows)]
    if report.optimisation:
        rows = [[name, op_counts_text(counts)] for name, counts in report.optimisation.items()]
        body += ["<h2>Graph optimisation</h2>", html_table(["Variant", "Op counts"], rows)]
    if report.layers:
        body += ["<h2>Per-layer ranks</h2>", html_table(*layer_table(report.layers))]
    return body
