"""A self-contained HTML page for a :class:`~lrt_deploy.report.comparison.ComparisonReport`.

Charts are inline SVG drawn here, so the page needs no plotting library, no scripts and no
network to view.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

from .comparison import layer_table, variant_table

if TYPE_CHECKING:
    from .comparison import ComparisonReport

__all__ = ["bar_chart_svg", "to_html"]

_BASELINE_COLOUR = "#8c8c8c"
_VARIANT_COLOUR = "#2b6cb0"
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.fallback { background: #fff4e5; border-left: 4px solid #dd6b20; padding: 0.5rem 1rem; }
.charts { display: flex; flex-wrap: wrap; gap: 2rem; }
"""


def bar_chart_svg(
    title: str,
    labels: Sequence[str],
    values: Sequence[float | None],
    *,
    unit: str = "",
    highlight: int | None = None,
) -> str:
    """Draw a horizontal bar chart as an SVG element.

    Args:
        title: Chart title.
        labels: One label per bar.
        values: One value per bar; None draws no bar and prints "n/a".
        unit: Appended to each printed value.
        highlight: Index of the bar drawn in the baseline colour.

    Returns:
        The ``<svg>`` markup.
    """
    bar_height, gap, label_width, bar_width, top = 22, 8, 160, 300, 30
    height = top + len(labels) * (bar_height + gap)
    largest = max((value for value in values if value is not None), default=0.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + bar_width + 110}" '
        f'height="{height}" role="img" aria-label="{escape(title)}">',
        f'<text x="0" y="18" font-weight="bold">{escape(title)}</text>',
    ]
    for index, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + index * (bar_height + gap)
        parts.append(
            f'<text x="0" y="{y + bar_height * 0.7:.1f}" font-size="13">{escape(label)}</text>'
        )
        if value is None:
            parts.append(f'<text x="{label_width}" y="{y + bar_height * 0.7:.1f}">n/a</text>')
            continue
        width = bar_width * value / largest
        colour = _BASELINE_COLOUR if index == highlight else _VARIANT_COLOUR
        parts += [
            f'<rect x="{label_width}" y="{y}" width="{width:.1f}" height="{bar_height}" '
            f'fill="{colour}"/>',
            f'<text x="{label_width + width + 6:.1f}" y="{y + bar_height * 0.7:.1f}" '
            f'font-size="13">{value:.2f}{escape(unit)}</text>',
        ]
    parts.append("</svg>")
    return "\n".join(parts)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(report: ComparisonReport) -> str:
    """Render the report as one HTML page with size and latency charts.

    Args:
        report: The comparison to render.

    Returns:
        A complete HTML document.
    """
    labels = [variant.name for variant in report.variants]
    baseline = next((i for i, v in enumerate(report.variants) if v.is_baseline), None)
    charts = [
        bar_chart_svg(
            "Model size",
            labels,
            [v.size_mb for v in report.variants],
            unit=" MB",
            highlight=baseline,
        ),
        bar_chart_svg(
            "Median latency",
            labels,
            [v.median_ms for v in report.variants],
            unit=" ms",
            highlight=baseline,
        ),
    ]
    body = [
        f"<h1>Compression report: {escape(report.model)}</h1>",
        f"<p>{escape(report.settings_line())}</p>",
    ]
    fallback = report.fallback_line()
    if fallback:
        body.append(
            f'<p class="fallback"><strong>Provider fallback:</strong> {escape(fallback)}</p>'
        )
    if report.settings.get("fidelity_inputs"):
        body.append(
            f"<p>Fidelity measured on: {escape(str(report.settings['fidelity_inputs']))}</p>"
        )
    if report.settings.get("baseline"):
        body.append(f"<p>Baseline: {escape(str(report.settings['baseline']))}</p>")
    body += [
        _html_table(*variant_table(report)),
        f'<div class="charts">{"".join(charts)}</div>',
    ]
    notes = [f"{v.name}: {note}" for v in report.variants for note in v.notes]
    notes += list(report.provider_messages)
    if notes:
        items = "".join(f"<li>{escape(note)}</li>" for note in notes)
        body.append(f"<h2>Notes</h2><ul>{items}</ul>")
    if report.quantisation:
        rows = [[str(key), str(value)] for key, value in report.quantisation.items()]
        body += ["<h2>Quantisation</h2>", _html_table(["Setting", "Value"], rows)]
    if report.optimisation:
        rows = [
            [name, ", ".join(f"{op} {count}" for op, count in counts.items())]
            for name, counts in report.optimisation.items()
        ]
        body += ["<h2>Graph optimisation</h2>", _html_table(["Variant", "Op counts"], rows)]
    if report.layers:
        body += ["<h2>Per-layer ranks</h2>", _html_table(*layer_table(report.layers))]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(report.model)} compression report</title>"
        f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
