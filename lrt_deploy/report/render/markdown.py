"""A comparison report as Markdown: header, variant table, notes, device classes, layers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .tables import (
    MISSING,
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
    from lrt_deploy.report.model import ComparisonReport, DeviceSection

__all__ = ["format_table", "markdown_table", "to_markdown"]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table; ``|`` inside cells is escaped."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_table(report: ComparisonReport) -> str:
    """The per-variant comparison as a Markdown table (also fine for a terminal)."""
    return markdown_table(*variant_table(report))


def to_markdown(report: ComparisonReport) -> str:
    """The report as Markdown: settings, variant table, notes, sections, per-layer ranks."""
    lines = [f"# Compression report: {report.model}", "", settings_line(report), ""]
    measured_on = measured_on_line(report)
    if measured_on:
        lines += [measured_on, ""]
    fallback = report.fallback_line()
    if fallback:
        lines += [f"**Provider fallback:** {fallback}", ""]
    settings = report.settings
    if settings.fidelity_inputs:
        lines += [f"Fidelity measured on: {settings.fidelity_inputs}", ""]
    if settings.baseline:
        lines += [f"Baseline: {settings.baseline}", ""]
    if settings.latency:
        lines += [f"Latency timed {settings.latency}", ""]
    baseline = report.baseline
    lines += [
        format_table(report),
        "",
        f"Ratios are against {baseline.name}, measured in the same run."
        if baseline else "No variant is marked as baseline, so no ratios are shown.",
        "",
    ]
    return "\n".join(lines + _sections(report)).rstrip("\n") + "\n"


def _sections(report: ComparisonReport) -> list[str]:
    """Notes, device classes, quantisation, graph optimisation and layers, as lines."""
    lines: list[str] = []
    notes = [f"- {v.name}: {note}" for v in report.variants for note in v.notes]
    notes += [f"- {message}" for message in report.provider_messages]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    if report.devices:
        lines += ["## Device classes", "", *_device_lines(report.devices), ""]
    if report.quantisation:
        lines += ["## Quantisation", ""]
        lines += [f"- {key}: {format_value(value)}" for key, value in report.quantisation.items()]
        lines += [""]
    if report.optimisation:
        lines += ["## Graph optimisation", "", "| Variant | Op counts |", "| --- | --- |"]
        lines += [f"| {name} | {op_counts_text(counts) or MISSING} |"
                  for name, counts in report.optimisation.items()]
        lines.append("")
    if report.layers:
        lines += ["## Per-layer ranks", "", markdown_table(*layer_table(report.layers))]
    return lines


def _device_lines(devices: DeviceSection) -> list[str]:
    """Which classes the int8 kernel is exact on, then the verification table."""
    lines = [exactness_line(devices)]
    table = device_table(devices)
    if table is not None:
        headers, rows, caption = table
        lines += ["", markdown_table(headers, rows).rstrip("\n"), "", caption]
    elif devices.skipped:
        lines += ["", f"Not run on other device classes: {devices.skipped}"]
    return lines
