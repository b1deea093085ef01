"""The compressed-vs-dense comparison: one record, rendered as JSON, Markdown and HTML.

Every ratio here (size vs baseline, speedup) is computed from the measured values stored in
the report when it is rendered; nothing is typed in by hand. The baseline is the variant
marked ``is_baseline`` (normally "dense fp32"), measured in the same run as the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lrt_deploy.runtime.files import write_atomic

__all__ = [
    "ComparisonReport",
    "VariantResult",
    "format_table",
    "format_value",
    "layer_table",
    "variant_table",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Above this many layers the rank table groups layers that differ only by block index.
MAX_LAYER_ROWS = 30
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*(?:e-?\d+)?")
_MISSING = "-"
_BYTES_PER_MB = 1e6


@dataclass
class VariantResult:
    """Measurements of one model variant (e.g. "dense fp32", "LRT int8").

    Attributes:
        name: Display name, unique within a report.
        file_bytes: Size of the deployable model file(s) in bytes.
        is_baseline: True for the one variant the others are compared with.
        params: Parameter count, when known.
        latency: Latency figures in ms, at least ``median_ms`` and ``p90_ms`` (a
            ``LatencyStats`` or anything with ``to_dict()`` is converted).
        fidelity: Agreement with the baseline's outputs, e.g. ``{"mean_cosine": 0.998,
            "worst_cosine": 0.991}``; any metric names are allowed.
        provider_report: ``Session.provider_report()`` of the run that produced ``latency``.
        notes: Free-form remarks shown under the table.
    """

    name: str
    file_bytes: int
    is_baseline: bool = False
    params: int | None = None
    latency: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    provider_report: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if hasattr(self.latency, "to_dict"):
            self.latency = self.latency.to_dict()
        if self.file_bytes < 0:
            raise ValueError(f"variant {self.name!r}: file_bytes must be >= 0")

    @property
    def size_mb(self) -> float:
        """File size in megabytes (10^6 bytes)."""
        return self.file_bytes / _BYTES_PER_MB

    @property
    def median_ms(self) -> float | None:
        """Median latency in ms, or None when not measured."""
        return self.latency.get("median_ms")

    def to_dict(self) -> dict[str, Any]:
        """Return the variant's stored fields as a JSON-ready dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantResult:
        """Rebuild a variant from :meth:`to_dict` output (computed keys are ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def device_table(devices: dict[str, Any]) -> tuple[list[str], list[list[str]], str] | None:
    """The verification table of a manifest's ``devices`` section, or None without one."""
    from lrt_deploy.verify.check import DeviceVerification

    verification = devices.get("verification")
    if not verification:
        return None
    return DeviceVerification.from_dict(verification).table()


def device_lines(devices: dict[str, Any]) -> list[str]:
    """Markdown lines: which classes the int8 kernel is exact on, then the verification table."""
    lines = [exactness_line(devices)]
    table = device_table(devices)
    if table is not None:
        headers, rows, caption = table
        lines += ["", _markdown_table(headers, rows).rstrip("\n"), "", caption]
    elif devices.get("skipped"):
        lines += ["", f"Not run on other device classes: {devices['skipped']}"]
    return lines


def exactness_line(devices: dict[str, Any]) -> str:
    exact = devices.get("exact_on") or []
    others = [name for name in devices.get("classes", []) if name not in exact]
    line = f"Integer kernels exact on: {', '.join(exact) or 'none'}"
    if others:
        line += f"; not on: {', '.join(others)}"
    return line + " (checked from the weights, lrt_deploy.quant.kernels)."


@dataclass
@dataclass
class ComparisonReport:
    """Size, latency and fidelity of compressed variants against the dense baseline.

    Attributes:
        model: Model name or path.
        variants: Measured variants; at most one has ``is_baseline``.
        settings: How the numbers were measured. Keys read when rendering: ``batch``,
            ``sequence``, ``threads``, ``provider_requested``, ``provider_active`` (a name or
            a list of names), ``fidelity_inputs`` (a description of the inputs compared) and
            ``baseline`` (how the baseline was made, when it is not the user's own dense
            model, e.g. "dense-equivalent (low-rank pairs multiplied out)") and ``latency``
            (how the latency columns were timed).
        layers: Per-layer decisions, dicts with ``name``, ``shape``, ``rank``, ``action``,
            ``reason``.
        optimisation: Variant name -> {op type: count} after graph optimisation.
        quantisation: Quantisation settings used for the int8 variants.
        provider_messages: Provider fallback messages (``Session.provider_report()["message"]``).
        devices: The deployed model per device class (the manifest's ``devices``: ``exact_on``
            and, for text models, ``verification``), or None.
    """

    model: str
    variants: list[VariantResult]
    settings: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    optimisation: dict[str, dict[str, int]] = field(default_factory=dict)
    quantisation: dict[str, Any] = field(default_factory=dict)
    provider_messages: list[str] = field(default_factory=list)
    devices: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        names = [variant.name for variant in self.variants]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(duplicates)}")
        baselines = [variant.name for variant in self.variants if variant.is_baseline]
        if len(baselines) > 1:
            raise ValueError(f"only one variant can be the baseline, got {', '.join(baselines)}")

    @property
    def baseline(self) -> VariantResult | None:
        """The variant marked ``is_baseline``, or None."""
        return next((variant for variant in self.variants if variant.is_baseline), None)

    def size_ratio(self, variant: VariantResult) -> float | None:
        """Return ``variant`` file size / baseline file size (0.5 means half the size)."""
        baseline = self.baseline
        if baseline is None or baseline.file_bytes == 0:
            return None
        return variant.file_bytes / baseline.file_bytes

    def speedup(self, variant: VariantResult) -> float | None:
        """Return baseline median latency / ``variant`` median latency (2.0 means twice as fast)."""
        baseline = self.baseline
        if baseline is None or not baseline.median_ms or not variant.median_ms:
            return None
        return baseline.median_ms / variant.median_ms

    def params_ratio(self, variant: VariantResult) -> float | None:
        """Return ``variant`` parameter count / baseline parameter count, when both are known."""
        baseline = self.baseline
        if baseline is None or not baseline.params or variant.params is None:
            return None
        return variant.params / baseline.params

    def fallback_line(self) -> str | None:
        """Return "requested X, ran on Y (fallback)" when a requested provider was not used."""
        for variant in self.variants:
            report = variant.provider_report
            if report.get("fell_back"):
                requested = report.get("missing") or report.get("requested") or []
                return _fallback_text(requested, report.get("active", []))
        requested = _as_list(self.settings.get("provider_requested"))
        active = _as_list(self.settings.get("provider_active"))
        if requested and active and requested[0] not in active:
            return _fallback_text([p for p in requested if p not in active], active)
        return None

    def active_provider(self) -> str:
        """Return the provider(s) the measurements ran on, for the header line."""
        active = _as_list(self.settings.get("provider_active"))
        if not active:
            active = next(
                (
                    v.provider_report["active"]
                    for v in self.variants
                    if v.provider_report.get("active")
                ),
                [],
            )
        return ", ".join(active) if active else "unknown"

    def to_dict(self) -> dict[str, Any]:
        """Return the report with computed ratios per variant, ready for ``json.dumps``."""
        variants = []
        for variant in self.variants:
            entry = variant.to_dict()
            entry.update(
                size_mb=variant.size_mb,
                size_ratio=self.size_ratio(variant),
                speedup=self.speedup(variant),
                params_ratio=self.params_ratio(variant),
            )
            variants.append(entry)
        baseline = self.baseline
        return _json_safe(
            {
                "format_version": FORMAT_VERSION,
                "model": self.model,
                "baseline": baseline.name if baseline else None,
                "settings": self.settings,
                "provider_fallback": self.fallback_line(),
                "provider_messages": self.provider_messages,
                "variants": variants,
                "layers": self.layers,
                "optimisation": self.optimisation,
                "quantisation": self.quantisation,
                "devices": self.devices,
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComparisonReport:
        """Rebuild a report from :meth:`to_dict` output (computed keys are ignored)."""
        return cls(
            model=data["model"],
            variants=[VariantResult.from_dict(v) for v in data.get("variants", [])],
            settings=data.get("settings", {}),
            layers=data.get("layers", []),
            optimisation=data.get("optimisation", {}),
            quantisation=data.get("quantisation", {}),
            provider_messages=data.get("provider_messages", []),
            devices=data.get("devices"),
        )

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as indented JSON (atomically) and return the path."""
        return _write_atomic(Path(path), json.dumps(self.to_dict(), indent=2, allow_nan=False))

    def settings_line(self) -> str:
        """Return the one-line description of how the numbers were measured."""
        parts = [
            f"{key} {self.settings[key]}"
            for key in ("batch", "sequence", "inputs", "threads")
            if self.settings.get(key) is not None
        ]
        parts.append(f"provider {self.active_provider()}")
        return " · ".join(parts)

    def to_markdown(self) -> str:
        """Render the report as Markdown: settings, variant table, notes, per-layer ranks."""
        lines = [f"# Compression report: {self.model}", "", self.settings_line(), ""]
        fallback = self.fallback_line()
        if fallback:
            lines += [f"**Provider fallback:** {fallback}", ""]
        if self.settings.get("fidelity_inputs"):
            lines += [f"Fidelity measured on: {self.settings['fidelity_inputs']}", ""]
        if self.settings.get("baseline"):
            lines += [f"Baseline: {self.settings['baseline']}", ""]
        if self.settings.get("latency"):
            lines += [f"Latency timed {self.settings['latency']}", ""]
        lines += [format_table(self), ""]
        baseline = self.baseline
        lines += [
            f"Ratios are against {baseline.name}, measured in the same run."
            if baseline
            else "No variant is marked as baseline, so no ratios are shown.",
            "",
        ]
        notes = [f"- {v.name}: {note}" for v in self.variants for note in v.notes]
        notes += [f"- {message}" for message in self.provider_messages]
        if notes:
            lines += ["## Notes", "", *notes, ""]
        if self.devices:
            lines += ["## Device classes", "", *device_lines(self.devices), ""]
        if self.quantisation:
            lines += ["## Quantisation", ""]
            lines += [
                f"- {key}: {format_value(value)}" for key, value in self.quantisation.items()
            ] + [""]
        if self.optimisation:
            lines += ["## Graph optimisation", "", "| Variant | Op counts |", "| --- | --- |"]
            for name, counts in self.optimisation.items():
                ops = ", ".join(f"{op} {count}" for op, count in counts.items()) or _MISSING
                lines.append(f"| {name} | {ops} |")
            lines.append("")
        if self.layers:
            headers, rows = layer_table(self.layers)
            lines += ["## Per-layer ranks", "", _markdown_table(headers, rows)]
        return "\n".join(lines).rstrip("\n") + "\n"

    def write(self, folder: str | os.PathLike[str], *, html: bool = True) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and (optionally) ``report.html`` into ``folder``.

        Args:
            folder: Destination folder, created if needed.
            html: Also write the self-contained HTML page with charts.

        Returns:
            Format (``"json"``, ``"markdown"``, ``"html"``) -> written path.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        written = {
            "json": self.to_json(out / "report.json"),
            "markdown": _write_atomic(out / "report.md", self.to_markdown()),
        }
        if html:
            from .html import to_html

            written["html"] = _write_atomic(out / "report.html", to_html(self))
        logger.info("wrote report to %s", out)
        return written


def variant_table(report: ComparisonReport) -> tuple[list[str], list[list[str]]]:
    """Return headers and formatted rows of the per-variant comparison table."""
    metrics = list(dict.fromkeys(key for v in report.variants for key in v.fidelity))
    headers = [
        "Variant",
        "Size (MB)",
        "Size vs baseline",
        "Median (ms)",
        "p90 (ms)",
        "Speedup",
        *(_metric_title(metric) for metric in metrics),
    ]
    rows = []
    for variant in report.variants:
        label = f"{variant.name} (baseline)" if variant.is_baseline else variant.name
        rows.append(
            [
                label,
                f"{variant.size_mb:.2f}",
                _format_ratio(report.size_ratio(variant)),
                _format_number(variant.latency.get("median_ms"), 2),
                _format_number(variant.latency.get("p90_ms"), 2),
                _format_ratio(report.speedup(variant)),
                *(
                    _format_number(variant.fidelity.get(metric), _METRIC_DIGITS.get(metric, 4))
                    for metric in metrics
                ),
            ]
        )
    return headers, rows


def layer_table(layers: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Return headers and rows of the per-layer rank table.

    With more than :data:`MAX_LAYER_ROWS` layers, layers whose names differ only in numeric
    parts (block indices) and that got the same shape, rank, action and reason are merged
    into one row such as ``encoder.layer.*.attention.self.query (x6)``.
    """
    headers = ["Layer", "Shape", "Rank", "Action", "Reason"]
    rows = [
        [
            str(layer.get("name", "")),
            _format_shape(layer.get("shape")),
            _MISSING if layer.get("rank") is None else str(layer["rank"]),
            str(layer.get("action", "")),
            str(layer.get("reason", "")),
        ]
        for layer in layers
    ]
    if len(rows) <= MAX_LAYER_ROWS:
        return headers, rows
    groups: dict[tuple[str, ...], list[list[str]]] = {}
    for row in rows:
        name, shape, rank, action, _ = row
        pattern = ".".join("*" if part.isdigit() else part for part in name.split("."))
        groups.setdefault((pattern, shape, rank, action), []).append(row)
    grouped = []
    for (pattern, shape, rank, action), members in groups.items():
        if len(members) == 1:
            grouped.append(members[0])
            continue
        reasons = {member[4] for member in members}
        # Reasons that differ only in their measured numbers are shown once, numbers elided
        # (each layer's own figures stay in manifest.json).
        reason = reasons.pop() if len(reasons) == 1 else _NUMBER.sub("…", members[0][4])
        grouped.append([f"{pattern} (x{len(members)})", shape, rank, action, reason])
    return headers, grouped


def format_table(report: ComparisonReport) -> str:
    """Return the per-variant comparison as a Markdown table (also fine for a terminal)."""
    return _markdown_table(*variant_table(report))


def _markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


_METRIC_TITLES = {
    "sqnr_db": "SQNR (dB)",
    "top1_agreement": "Top-1 agreement",
    "kl_divergence": "KL (nats)",
}


# Decimals a metric carries: an SQNR is good to about 0.1 dB on a few thousand values.
_METRIC_DIGITS = {"sqnr_db": 1}


def format_value(value: Any) -> str:
    """A setting or count as plain words: ``{"MatMulInteger": 36}`` -> ``MatMulInteger 36``,
    lists joined by commas, ``True`` -> ``yes``; never a Python repr."""
    if value is None or value == {} or value == []:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{key} {format_value(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(format_value(item) for item in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metric_title(metric: str) -> str:
    return _METRIC_TITLES.get(metric, metric.replace("_", " ").capitalize())


def _format_ratio(value: float | None) -> str:
    # Three significant digits, so an int8 variant at 1/16 of the size still reads 0.0625x.
    return _MISSING if value is None else f"{value:.3g}x"


def _format_number(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else _MISSING
    return _MISSING if value is None else str(value)


def _format_shape(shape: Any) -> str:
    if shape is None:
        return _MISSING
    if isinstance(shape, list | tuple):
        return "x".join(str(dim) for dim in shape)
    return str(shape)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _fallback_text(requested: Sequence[str], active: Sequence[str]) -> str:
    ran_on = ", ".join(active) if active else "CPUExecutionProvider"
    return f"requested {', '.join(requested)}, ran on {ran_on} (fallback)"


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf by None (JSON has no such numbers), tuples and arrays by lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, without importing numpy
        return _json_safe(value.tolist())
    return value


#: The report's files and lrt-report's outputs are written whole or not at all.
_write_atomic = write_atomic
