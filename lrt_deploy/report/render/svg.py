"""Charts as inline SVG, so a report page needs no plotting library, scripts or network."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

__all__ = [
    "PALETTE",
    "bar_chart_svg",
    "line_chart_svg",
    "pareto_front",
    "pareto_svg",
    "stacked_bar_svg",
]

_BASELINE_COLOUR = "#8c8c8c"
_VARIANT_COLOUR = "#2b6cb0"


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


#: Colours for series (bundles) and components, distinguishable in print and for most
#: colour-vision deficiencies (Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``low``..``high``."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    ticks = [math.floor(low / step) * step]
    # The last tick is at or above ``high``, so every value falls inside the frame.
    while ticks[-1] < high - step * 1e-9:
        ticks.append(ticks[-1] + step)
    return [round(tick, 10) for tick in ticks]


def _tick_label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def stacked_bar_svg(
    title: str,
    labels: Sequence[str],
    parts: Sequence[str],
    values: Sequence[Sequence[float]],
    *,
    unit: str = "",
) -> str:
    """Draw horizontal stacked bars (one per label, one segment per part) as SVG.

    Args:
        title: Chart title.
        labels: One label per bar.
        parts: Segment names, shown in the legend.
        values: ``values[bar][part]``, non-negative.
        unit: Appended to the printed totals.

    Returns:
        The ``<svg>`` markup.
    """
    bar_height, gap, label_width, bar_width, top = 24, 10, 170, 380, 56
    height = top + len(labels) * (bar_height + gap) + 10
    largest = max((sum(row) for row in values), default=0.0) or 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" '
        f'width="{label_width + bar_width + 90}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="0" y="18" font-weight="bold">{escape(title)}</text>',
    ]
    x = 0
    for index, part in enumerate(parts):
        colour = PALETTE[index % len(PALETTE)]
        out += [
            f'<rect x="{x}" y="28" width="12" height="12" fill="{colour}"/>',
            f'<text x="{x + 16}" y="39" font-size="12">{escape(part)}</text>',
        ]
        x += 26 + 7 * len(part)
    for row_index, (label, row) in enumerate(zip(labels, values, strict=True)):
        y = top + row_index * (bar_height + gap)
        out.append(
            f'<text x="0" y="{y + bar_height * 0.7:.1f}" font-size="13">{escape(label)}</text>'
        )
        offset = float(label_width)
        for index, (part, value) in enumerate(zip(parts, row, strict=True)):
            width = bar_width * value / largest
            out.append(
                f'<rect x="{offset:.1f}" y="{y}" width="{width:.1f}" height="{bar_height}" '
                f'fill="{PALETTE[index % len(PALETTE)]}"><title>{escape(label)}: '
                f"{escape(part)} {value:.2f}{escape(unit)}</title></rect>"
            )
            offset += width
        out.append(
            f'<text x="{offset + 6:.1f}" y="{y + bar_height * 0.7:.1f}" font-size="13">'
            f"{sum(row):.2f}{escape(unit)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


def _axes(
    title: str,
    x_ticks: Sequence[float],
    y_ticks: Sequence[float],
    x_label: str,
    y_label: str,
    box: tuple[int, int, int, int],
    *,
    x_log: bool = False,
) -> tuple[list[str], Any, Any]:
    """Frame, ticks and labels of an x/y chart; returns markup and the two scale functions."""
    left, top, width, height = box
    x_low, x_high = x_ticks[0], x_ticks[-1]
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def sx(value: float) -> float:
        if x_log:
            span = math.log(x_high) - math.log(x_low) or 1.0
            return left + width * (math.log(value) - math.log(x_low)) / span
        return left + width * (value - x_low) / ((x_high - x_low) or 1.0)

    def sy(value: float) -> float:
        return top + height - height * (value - y_low) / ((y_high - y_low) or 1.0)

    out = [
        f'<text x="0" y="18" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" '
        'stroke="#999"/>',
    ]
    for tick in x_ticks:
        x = sx(tick)
        out += [
            f'<line x1="{x:.1f}" y1="{top + height}" x2="{x:.1f}" y2="{top + height + 4}" '
            'stroke="#999"/>',
            f'<text x="{x:.1f}" y="{top + height + 17}" font-size="11" text-anchor="middle">'
            f"{_tick_label(tick)}</text>",
        ]
    for tick in y_ticks:
        y = sy(tick)
        out += [
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" stroke="#eee"/>',
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
            f"{_tick_label(tick)}</text>",
        ]
    out += [
        f'<text x="{left + width / 2:.1f}" y="{top + height + 34}" font-size="12" '
        f'text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="14" y="{top + height / 2:.1f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + height / 2:.1f})">{escape(y_label)}</text>',
    ]
    return out, sx, sy


def line_chart_svg(
    title: str,
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    x_label: str,
    y_label: str,
    x_log: bool = False,
) -> str:
    """Draw one polyline with markers per series as SVG.

    Args:
        title: Chart title.
        series: ``(name, [(x, y), ...])`` per line.
        x_label: Axis caption.
        y_label: Axis caption.
        x_log: Logarithmic x axis (x values must be > 0), ticks at the data's x values.

    Returns:
        The ``<svg>`` markup.
    """
    points = [point for _, data in series for point in data]
    xs = sorted({x for x, _ in points}) or [1.0]
    ys = [y for _, y in points] or [1.0]
    x_ticks = xs if x_log else _nice_ticks(min(xs), max(xs))
    if len(x_ticks) == 1:
        x_ticks = [x_ticks[0] / 2, x_ticks[0] * 2] if x_log else [x_ticks[0] - 1, x_ticks[0] + 1]
    y_ticks = _nice_ticks(0.0, max(ys) * 1.05)
    box = (60, 32, 420, 230)
    legend_top = box[1] + box[3] + 48
    height = legend_top + 18 * len(series) + 6
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{box[0] + box[2] + 30}" '
        f'height="{height}" role="img" aria-label="{escape(title)}">'
    ]
    axes, sx, sy = _axes(title, x_ticks, y_ticks, x_label, y_label, box, x_log=x_log)
    out += axes
    for index, (name, data) in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        ordered = sorted(data)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ordered)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in ordered:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{colour}">'
                f"<title>{escape(name)}: {y:.2f} at {_tick_label(x)}</title></circle>"
            )
        legend_y = legend_top + 18 * index
        out += [
            f'<line x1="{box[0]}" y1="{legend_y - 4}" x2="{box[0] + 18}" y2="{legend_y - 4}" '
            f'stroke="{colour}" stroke-width="3"/>',
            f'<text x="{box[0] + 24}" y="{legend_y}" font-size="12">{escape(name)}</text>',
        ]
    out.append("</svg>")
    return "\n".join(out)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: smaller (or equal) x and higher y.

    x is a cost (size), y a quality (fidelity). Returned in increasing x.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = float("-inf")
    for index in order:
        if points[index][1] > best:
            front.append(index)
            best = points[index][1]
    return front


def pareto_svg(
    title: str,
    names: Sequence[str],
    points: Sequence[tuple[float, float]],
    *,
    x_label: str,
    y_label: str,
) -> str:
    """Scatter cost (x) against quality (y) with the Pareto front drawn as a step line.

    Args:
        title: Chart title.
        names: One label per point.
        points: ``(x, y)`` per point; lower x and higher y are better.
        x_label: Axis caption.
        y_label: Axis caption.

    Returns:
        The ``<svg>`` markup; front points are filled, dominated ones hollow.
    """
    xs = [x for x, _ in points] or [1.0]
    ys = [y for _, y in points] or [1.0]
    x_ticks = _nice_ticks(0.0, max(xs) * 1.08)
    y_span = max(max(ys) - min(ys), 1e-3)
    y_ticks = _nice_ticks(min(ys) - 0.15 * y_span, max(ys) + 0.1 * y_span)
    if max(ys) <= 1.0 < y_ticks[-1]:
        # Cosines and agreement rates end at 1: no axis above what is possible.
        y_ticks = [tick for tick in y_ticks if tick <= 1.0] or y_ticks
    box = (70, 32, 420, 230)
    front = pareto_front(points)
    height = box[1] + box[3] + 48 + 18 * len(points) + 6
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{box[0] + box[2] + 30}" '
        f'height="{height}" role="img" aria-label="{escape(title)}">'
    ]
    axes, sx, sy = _axes(title, x_ticks, y_ticks, x_label, y_label, box)
    out += axes
    if front:
        steps = []
        for position, index in enumerate(front):
            x, y = points[index]
            if position:
                steps.append(f"{sx(x):.1f},{sy(points[front[position - 1]][1]):.1f}")
            steps.append(f"{sx(x):.1f},{sy(y):.1f}")
        out.append(
            f'<polyline class="pareto-front" points="{" ".join(steps)}" fill="none" '
            'stroke="#555" stroke-dasharray="5,3" stroke-width="1.5"/>'
        )
    for index, (name, (x, y)) in enumerate(zip(names, points, strict=True)):
        colour = PALETTE[index % len(PALETTE)]
        on_front = index in front
        fill = colour if on_front else "white"
        out.append(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{fill}" stroke="{colour}" '
            f'stroke-width="2"><title>{escape(name)}: {x:.2f}, {y:.4f}'
            f"{' (Pareto front)' if on_front else ''}</title></circle>"
        )
        legend_y = box[1] + box[3] + 48 + 18 * index
        mark = "on the Pareto front" if on_front else "dominated"
        out += [
            f'<circle cx="{box[0] + 6}" cy="{legend_y - 4}" r="5" fill="{fill}" '
            f'stroke="{colour}" stroke-width="2"/>',
            f'<text x="{box[0] + 18}" y="{legend_y}" font-size="12">{escape(name)} '
            f"({x:.2f}, {y:.4f}; {mark})</text>",
        ]
    out.append("</svg>")
    return "\n".join(out)
