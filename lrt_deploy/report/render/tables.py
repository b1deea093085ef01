"""The tables and lines every renderer of a comparison report shows, as plain strings.

Reads the report model only; Markdown and HTML differ in markup, never in content.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrt_deploy.report.model import ComparisonReport, DeviceSection, LayerRow

__all__ = [
    "MAX_LAYER_ROWS",
    "MISSING",
    "device_table",
    "exactness_line",
    "format_value",
    "layer_table",
    "measured_on_line",
    "metric_title",
    "op_counts_text",
    "settings_line",
    "variant_table",
]

#: Above this many layers the rank table groups layers that differ only by block index.
MAX_LAYER_ROWS = 30
MISSING = "-"
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*(?:e-?\d+)?")
_METRIC_TITLES = {
    "sqnr_db": "SQNR (dB)",
    "top1_agreement": "Top-1 agreement",
    "kl_divergence": "KL (nats)",
}
# Decimals a metric carries: an SQNR is good to about 0.1 dB on a few thousand values.
_METRIC_DIGITS = {"sqnr_db": 1}


def settings_line(report: ComparisonReport) -> str:
    """The one-line description of how the numbers were measured."""
    settings = report.settings
    parts = [
        f"{key} {value}"
        for key, value in (("batch", settings.batch), ("sequence", settings.sequence),
                           ("inputs", settings.inputs), ("threads", settings.threads))
        if value is not None
    ]
    parts.append(f"provider {report.active_provider()}")
    return " · ".join(parts)


def measured_on_line(report: ComparisonReport) -> str | None:
    """"Measured on <CPU> (device class <class>)", or None when the report does not say."""
    settings = report.settings
    if settings.cpu is None and settings.device_class is None:
        return None
    return (f"Measured on {settings.cpu or 'an unknown CPU'} (device class "
            f"{settings.device_class or 'unknown'})")


def variant_table(report: ComparisonReport) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows of the per-variant comparison table."""
    metrics = list(dict.fromkeys(key for v in report.variants for key in v.fidelity))
    headers = ["Variant", "Size (MB)", "Size vs baseline", "Median (ms)", "p90 (ms)", "Speedup",
               *(metric_title(metric) for metric in metrics)]
    rows = [
        [
            f"{variant.name} (baseline)" if variant.is_baseline else variant.name,
            f"{variant.size_mb:.2f}",
            _format_ratio(report.size_ratio(variant)),
            _format_number(variant.latency.get("median_ms"), 2),
            _format_number(variant.latency.get("p90_ms"), 2),
            _format_ratio(report.speedup(variant)),
            *(_format_number(variant.fidelity.get(metric), _METRIC_DIGITS.get(metric, 4))
              for metric in metrics),
        ]
        for variant in report.variants
    ]
    return headers, rows


def layer_table(layers: Sequence[LayerRow]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the per-layer rank table.

    With more than :data:`MAX_LAYER_ROWS` layers, layers whose names differ only in numeric
    parts (block indices) and that share shape, rank, action and the wording of their reason
    are merged into one row such as ``encoder.layer.*.attention.self.query (x6)``, each number
    of the reason shown as the group's range (``rank 96-128``).
    """
    headers = ["Layer", "Shape", "Rank", "Action", "Reason"]
    rows = [
        [str(layer.name), _format_shape(layer.shape),
         MISSING if layer.rank is None else str(layer.rank), str(layer.action), str(layer.reason)]
        for layer in layers
    ]
    if len(rows) <= MAX_LAYER_ROWS:
        return headers, rows
    groups: dict[tuple[str, ...], list[list[str]]] = {}
    for row in rows:
        name, shape, rank, action, reason = row
        pattern = ".".join("*" if part.isdigit() else part for part in name.split("."))
        wording = _NUMBER.sub("#", reason)
        groups.setdefault((pattern, shape, rank, action, wording), []).append(row)
    grouped = []
    for (pattern, shape, rank, action, _), members in groups.items():
        if len(members) == 1:
            grouped.append(members[0])
        else:
            reason = _reason_ranges([member[4] for member in members])
            grouped.append([f"{pattern} (x{len(members)})", shape, rank, action, reason])
    return headers, grouped


def _reason_ranges(reasons: Sequence[str]) -> str:
    """One reason for several that share their wording, each number as its range."""
    numbers = [_NUMBER.findall(reason) for reason in reasons]
    spans = []
    for values in zip(*numbers, strict=True):
        low = min(values, key=_number_value)
        high = max(values, key=_number_value)
        spans.append(low if _number_value(low) == _number_value(high) else f"{low}-{high}")
    spans.reverse()
    return _NUMBER.sub(lambda _match: spans.pop(), reasons[0])


def _number_value(text: str) -> float:
    return float(text.replace(",", ""))


def device_table(devices: DeviceSection) -> tuple[list[str], list[list[str]], str] | None:
    """The verification table of the device section (headers, rows, caption), or None."""
    from lrt_deploy.verify.check import DeviceVerification

    if not devices.verification:
        return None
    return DeviceVerification.from_dict(devices.verification).table()


def exactness_line(devices: DeviceSection) -> str:
    """Which device classes the integer kernels are exact on, and which not."""
    others = [name for name in devices.classes if name not in devices.exact_on]
    line = f"Integer kernels exact on: {', '.join(devices.exact_on) or 'none'}"
    if others:
        line += f"; not on: {', '.join(others)}"
    return line + " (checked from the weights, lrt_deploy.quant.kernels)."


def format_value(value: Any) -> str:
    """A setting or count as plain words (``{"MatMulInteger": 36}`` -> ``MatMulInteger 36``,
    lists joined by commas, ``True`` -> ``yes``), never a Python repr."""
    if value is None or value == {} or value == []:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{key} {format_value(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(format_value(item) for item in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def op_counts_text(counts: dict[str, int]) -> str:
    """``{"FusedMatMul": 12}`` -> ``FusedMatMul 12``."""
    return ", ".join(f"{op} {count}" for op, count in counts.items())


def metric_title(metric: str) -> str:
    """The column title of a fidelity metric."""
    return _METRIC_TITLES.get(metric, metric.replace("_", " ").capitalize())


def _format_ratio(value: float | None) -> str:
    # Three significant digits, so an int8 variant at 1/16 of the size still reads 0.0625x.
    return MISSING if value is None else f"{value:.3g}x"


def _format_number(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else MISSING
    return MISSING if value is None else str(value)


def _format_shape(shape: Any) -> str:
    if shape is None:
        return MISSING
    if isinstance(shape, list | tuple):
        return "x".join(str(dim) for dim in shape)
    return str(shape)
